"""The embedded engine's fast decode path: a static KV cache, CUDA graphs and sampling on the device.

HF's forward with a ``DynamicCache`` costs hundreds of kernel launches and
Python calls per token, and reading each sampled token back to the host stalls
the GPU every step; at batch 256 that left the engine at a few thousand tokens
per second on an H100, far below what the weights' bandwidth allows. This
module runs the same decoder weights (the HF modules themselves: embedding,
norms, projections, MLP, rotary table) through a forward of its own that

* keeps K/V in preallocated per-layer buffers ``[rows, kv_heads, length,
  head_dim]``: row r's prompt sits in slots ``0..len_r-1`` and each decoded
  token is written at its row's next slot, so positions are the true ones and
  no padding moves;
* decodes one token for every row in a fixed number of kernels with fixed
  shapes (a batch bucket and an attention window bucket), which on CUDA are
  captured once as a CUDA graph per (rows, window, sampling flags) and replayed;
* samples on the device (:func:`miles.engine.sampling.sample_batch`) from
  per-row parameter tensors and per-row draws fixed at the start of the batch,
  and records tokens and logprobs in device buffers. The host reads them back
  every few steps (:class:`~miles.engine.core.Engine` decides when), never
  once per token.

Finished rows stay in the batch (their extra tokens are discarded) until the
engine compacts the live rows into a smaller batch bucket.

The buffers themselves, and how a batch is loaded into them and compacted, are
:mod:`miles.engine.decode_workspace`'s; this module is the forward that runs in
them, the packed weights and the graphs.

Only Llama-family decoders are run this way (``qwen2``, ``qwen3``, ``llama``,
``mistral`` without sliding windows, RoPE without dynamic scaling);
:meth:`StaticDecoder.unsupported` names why another model is not, and the
engine then falls back to HF's own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from miles.engine import decode_attention as attention
from miles.engine.decode_workspace import MEMORY_SHARE, MIN_WINDOW, Workspace, bucket
from miles.engine.fusion import Fusion, fusable, norm_args, rms_args
from miles.engine.fusion import rope as fusion_rope
from miles.engine.sampling import BatchSampling, block_early_stops

FAMILIES = frozenset({"qwen2", "qwen3", "llama", "mistral"})
"""HF ``model_type`` values whose decoder layer is pre-norm attention + gated MLP with RoPE, as run here."""

PACK_SHARE = 0.2
"""Largest share of the GPU's free memory the packed q/k/v and gate/up copies may take."""


class StaticDecoder:
    """Decodes batches of one model through static buffers (and CUDA graphs on CUDA devices)."""

    def __init__(self, model: Any, device: torch.device, cuda_graphs: bool = True, fuse: bool | None = None) -> None:
        self.model = model
        self.device = device
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.fusion = Fusion.for_device(device, fuse)
        """The decode step's elementwise chains and sampling, compiled (:mod:`miles.engine.fusion`) or eager."""
        self.fusable = False
        """Whether this model's layers can take the fused forward (set with the packed weights)."""
        self.fused_layers = self.fusion.on
        """Run the fused forward's layer order (tests: also eager, where it must equal the plain forward)."""
        cfg = model.config
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        self.group = self.n_heads // self.n_kv
        self.n_layers = len(model.model.layers)
        self.vocab = int(model.lm_head.out_features)
        self.triton_attention = self.fusion.on and attention.supported(device, self.head_dim, self.group)
        """The fused step's attention: miles' Triton kernel (else SDPA with a length mask)."""
        self.ws: Workspace | None = None
        self._pool: Any = None
        self._weights_key: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
        self.packs: list[list[torch.Tensor | None]] | None = None
        self._unversioned = 0
        self.rehearse = False
        """Tests: without CUDA graphs, still run (and undo) a capture's warm-up step at each new graph key."""
        self.rehearsed: set[tuple[Any, ...]] = set()
        self._pack_sources: list[list[list[torch.Tensor | None]]] = []

    @staticmethod
    def unsupported(model: Any) -> str | None:
        """Why ``model`` cannot be decoded here (None when it can)."""
        cfg = model.config
        kind = getattr(cfg, "model_type", None)
        if kind not in FAMILIES:
            return f"model_type {kind!r} is not one of {sorted(FAMILIES)}"
        inner: Any = getattr(model, "model", None)
        for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(inner, name):
                return f"the model has no model.{name}"
        if not isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
            return "lm_head is not a Linear"
        if getattr(cfg, "use_sliding_window", False) or any(
            t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])
        ):
            return "sliding-window attention"
        if kind == "mistral" and getattr(cfg, "sliding_window", None):
            return "sliding-window attention"
        rope = str(getattr(inner.rotary_emb, "rope_type", "default"))
        if "dynamic" in rope or rope == "longrope":
            return f"rope_type {rope!r} depends on the sequence length"
        attn = inner.layers[0].self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(attn, name):
                return f"attention has no {name}"
        return None

    # ------------------------------------------------------------------ workspace

    def bytes_per_row(self, length: int) -> int:
        itemsize = self.model.lm_head.weight.element_size()
        kv = 2 * self.n_layers * self.n_kv * length * self.head_dim * itemsize
        return kv + 4 * self.vocab * 3 + 12 * length

    def max_rows(self, length: int) -> int:
        """Rows a workspace of ``length`` slots may hold on this device (unbounded on CPU)."""
        if self.device.type != "cuda":
            return 1 << 30
        held = 0 if self.ws is None else self.ws.rows * self.bytes_per_row(self.ws.length)
        free, _ = torch.cuda.mem_get_info(self.device)
        rows = int((free + held) * MEMORY_SHARE) // self.bytes_per_row(bucket(length, MIN_WINDOW))
        return max(1, 1 << (max(rows, 1).bit_length() - 1))  # a power of two: a bucket of its own

    def _workspace(self, rows: int, length: int) -> Workspace:
        ws = self.ws
        if ws is not None and ws.rows >= rows and ws.length >= length and ws.raw == self.fusion.on:
            return ws
        rows = max(rows, ws.rows if ws is not None else 0)
        length = bucket(max(length, ws.length if ws is not None else 0), MIN_WINDOW)
        self.ws = None
        self._pool = None  # the old workspace's graphs die with it, and their pool with them (see _drop_graphs)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.ws = Workspace.allocate(
            self.model, self.device, rows, length, self.n_kv, self.head_dim, self.n_layers, self.vocab, self.fusion.on
        )
        return self.ws

    # ------------------------------------------------------------------ packed weights

    def _pack(self) -> None:
        """Concatenate each layer's q/k/v and gate/up weights, so each is one matmul (fewer kernels per step).

        The packs are copies, refreshed in place whenever a source tensor changes (its version counter moves,
        e.g. on a weight sync), so captured graphs keep reading the same addresses. On a GPU they are made only
        when they take under ``PACK_SHARE`` of the free memory; otherwise the HF modules run one by one.
        """
        layers = list(self.model.model.layers)
        groups: list[list[list[torch.Tensor | None]]] = []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            entry = [
                [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight],
                [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias],
            ]
            if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                entry += [[mlp.gate_proj.weight, mlp.up_proj.weight], [mlp.gate_proj.bias, mlp.up_proj.bias]]
            groups.append(entry)
        extra = sum(t.numel() * t.element_size() for g in groups for part in g for t in part if t is not None)
        if self.device.type == "cuda" and extra > PACK_SHARE * torch.cuda.mem_get_info(self.device)[0]:
            self.packs = None
            self.fusable = False
            return
        self.packs = []
        for g in groups:
            packed: list[torch.Tensor | None] = []
            for part in g:
                if any(t is None for t in part):
                    packed.append(None)
                else:
                    packed.append(torch.cat([t.detach() for t in part if t is not None]))
            self.packs.append(packed)
        self._pack_sources = groups
        self.fusable = fusable(self.model, self.packs)

    def _repack(self) -> None:
        assert self.packs is not None
        for packed, g in zip(self.packs, self._pack_sources, strict=True):
            for dst, part in zip(packed, g, strict=True):
                if dst is not None:
                    torch.cat([t.detach() for t in part if t is not None], out=dst)

    def _state_key(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        params = list(self.model.parameters())
        try:
            versions = tuple(p._version for p in params)
        except RuntimeError:  # inference tensors keep no version counter: assume they changed
            self._unversioned += 1
            versions = (-self._unversioned,)
        return tuple(p.data_ptr() for p in params), versions

    def drop(self) -> None:
        """Free the workspace, graphs and packed weights (release_memory_occupation); rebuilt on next use."""
        self.ws = None
        self.packs = None
        self._pack_sources = []
        self._pool = None
        self._weights_key = ((), ())
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def set_fusion(self, on: bool) -> None:
        """Switch fusing on or off (``miles bench rollout --fuse compare`` times both); later graphs use it."""
        self.fusion = Fusion.for_device(self.device, on)
        self.fused_layers = on
        self.triton_attention = on and attention.supported(self.device, self.head_dim, self.group)
        if self.ws is not None:
            self._drop_graphs(self.ws)

    def refresh(self) -> None:
        """Follow weight changes: new storage (e.g. after release/resume) drops the CUDA graphs, which hold
        addresses; new values (a weight sync) refresh the packed copies in place."""
        ptrs, versions = self._state_key()
        if ptrs != self._weights_key[0]:
            if self.ws is not None:
                self._drop_graphs(self.ws)
            self._pack()
        elif versions != self._weights_key[1] and self.packs is not None:
            self._repack()
        self._weights_key = (ptrs, versions)

    # ------------------------------------------------------------------ forward

    def _norm(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        """HF's RMSNorm through torch's ``rms_norm``, which computes it the same way (normalise in float32,
        round to the input's dtype, then scale by the weight) in one call instead of HF's seven kernels."""
        args = norm_args(module)
        return module(x) if args is None else F.rms_norm(x, (x.shape[-1],), *args)  # type: ignore[no-any-return]

    def _qkv(
        self, li: int, layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [b, t, heads, d], k and v [b, t, kv_heads, d] of normalised input ``x``, RoPE applied."""
        attn = layer.self_attn
        b, t = x.shape[:2]
        if self.packs is not None:
            w, bias = self.packs[li][0], self.packs[li][1]
            assert w is not None
            qkv = F.linear(x, w, bias)
        else:
            qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
        qkv = qkv.view(b, t, self.n_heads + 2 * self.n_kv, self.head_dim)
        heads = self.n_heads + self.n_kv
        qk, v = qkv[:, :, :heads], qkv[:, :, heads:]
        if getattr(attn, "q_norm", None) is not None:  # qwen3 normalises each head before RoPE
            qk = torch.cat(
                [self._norm(attn.q_norm, qk[:, :, : self.n_heads]), self._norm(attn.k_norm, qk[:, :, self.n_heads :])],
                dim=2,
            )
        # HF's q * cos + rotate_half(q) * sin, with rotate_half's sign folded into the sin table
        qk = self.fusion.rope(qk, cos, sin) if fused else fusion_rope(qk, cos, sin)
        return qk[:, :, : self.n_heads], qk[:, :, self.n_heads :], v

    def _mlp(self, li: int, layer: Any, h: torch.Tensor) -> torch.Tensor:
        x = self._norm(layer.post_attention_layernorm, h)
        mlp = layer.mlp
        if self.packs is None or len(self.packs[li]) < 4:
            return h + mlp(x)
        w, bias = self.packs[li][2], self.packs[li][3]
        assert w is not None
        gate, up = F.linear(x, w, bias).chunk(2, dim=-1)
        return h + mlp.down_proj(mlp.act_fn(gate) * up)

    def _scaling(self, layer: Any) -> float:
        return float(getattr(layer.self_attn, "scaling", self.head_dim**-0.5))

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, rows: slice, full: bool) -> torch.Tensor:
        """Run right-padded prompts ``ids`` [c, t] into workspace rows ``rows``; return final hidden states.

        Returns [c, t, hidden] when ``full`` (prompt logprobs), else each row's last position [c, hidden].
        """
        ws = self.ws
        assert ws is not None
        inner = self.model.model
        c, t = ids.shape
        h = inner.embed_tokens(ids)
        cos, sin = ws.cos[:t].view(1, t, 1, -1), ws.sin[:t].view(1, t, 1, -1)
        causal = torch.ones((t, t), dtype=torch.bool, device=ids.device).tril()
        mask = (causal.unsqueeze(0) & (ws.slots[:t].view(1, 1, t) < lengths.view(c, 1, 1))).unsqueeze(1)
        for li, layer in enumerate(inner.layers):
            q, k, v = self._qkv(li, layer, self._norm(layer.input_layernorm, h), cos, sin)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ws.k[li][rows, :, :t] = k
            ws.v[li][rows, :, :t] = v
            k = k.repeat_interleave(self.group, dim=1)
            v = v.repeat_interleave(self.group, dim=1)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self._scaling(layer))
            h = h + layer.self_attn.o_proj(a.transpose(1, 2).reshape(c, t, -1))
            h = self._mlp(li, layer, h)
        if not full:
            h = h[torch.arange(c, device=h.device), lengths - 1]
        return self._norm(inner.norm, h)

    def _decode_forward(self, b: int, window: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [b, vocab] (model dtype) of each row's token ``tok`` at slot ``pos``, writing its K/V there
        (into ``out`` when given: the fused path)."""
        ws = self.ws
        assert ws is not None
        inner = self.model.model
        tok, pos, rows = ws.tok[:b], ws.pos[:b], ws.row_ids[:b]
        h = inner.embed_tokens(tok).unsqueeze(1)
        cos = ws.cos.index_select(0, pos).view(b, 1, 1, -1)
        sin = ws.sin.index_select(0, pos).view(b, 1, 1, -1)
        if self.fused_layers and self.fusable:
            x = self._decode_layers_fused(h, cos, sin, b, window)[:, 0]
            head = self.model.lm_head
            if out is None or head.bias is not None:
                return head(x) if out is None else out.copy_(head(x))  # type: ignore[no-any-return]
            return torch.mm(x, head.weight.t(), out=out)
        bias = self._length_bias(b, window, h.dtype)
        for li, layer in enumerate(inner.layers):
            q, k, v = self._qkv(li, layer, self._norm(layer.input_layernorm, h), cos, sin)
            kc, vc = ws.k[li], ws.v[li]
            kc[rows, :, pos] = k[:, 0]
            vc[rows, :, pos] = v[:, 0]
            # the query heads sharing a KV head act as that head's queries (HF's repeat_kv, without the copy)
            qg = q.reshape(b, self.n_kv, self.group, self.head_dim)
            a = F.scaled_dot_product_attention(
                qg, kc[:b, :, :window], vc[:b, :, :window], attn_mask=bias, scale=self._scaling(layer)
            )
            h = h + layer.self_attn.o_proj(a.reshape(b, 1, -1))
            h = self._mlp(li, layer, h)
        logits = self.model.lm_head(self._norm(inner.norm, h)[:, 0])
        return logits if out is None else out.copy_(logits)  # type: ignore[no-any-return]

    def _length_bias(self, b: int, window: int, dtype: torch.dtype) -> torch.Tensor:
        """SDPA's additive mask [b, 1, 1, window]: row i sees slots ``0..pos[i]`` of the window."""
        ws = self.ws
        assert ws is not None
        visible = ws.slots[:window].unsqueeze(0) <= ws.pos[:b].unsqueeze(1)
        bias = torch.zeros((b, window), dtype=dtype, device=self.device).masked_fill_(~visible, float("-inf"))
        return bias.view(b, 1, 1, window)

    def _decode_layers_fused(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, b: int, window: int
    ) -> torch.Tensor:
        """:meth:`_decode_forward`'s layers with each residual add fused into the norm after it, RoPE in one
        kernel with the K/V cache writes and SiLU x up in one: the same weights and operations, about half the
        kernels. Returns the final norm's output [b, 1, hidden] (the caller applies lm_head)."""
        ws, fusion, inner = self.ws, self.fusion, self.model.model
        assert ws is not None and self.packs is not None
        layers = inner.layers
        pos, rows = ws.pos[:b], ws.row_ids[:b]
        x = F.rms_norm(h, (h.shape[-1],), *rms_args(layers[0].input_layernorm))
        bias = None if self.triton_attention else self._length_bias(b, window, h.dtype)
        for li, layer in enumerate(layers):
            kc, vc = ws.k[li], ws.v[li]
            w_qkv = self.packs[li][0]
            if getattr(layer.self_attn, "q_norm", None) is None and w_qkv is not None:
                qkv = F.linear(x, w_qkv, self.packs[li][1]).view(b, 1, self.n_heads + 2 * self.n_kv, self.head_dim)
                q = fusion.rope_store(qkv, cos, sin, kc, vc, rows, pos, self.n_heads)
            else:
                q, k, v = self._qkv(li, layer, x, cos, sin, fused=True)
                kc[rows, :, pos] = k[:, 0]
                vc[rows, :, pos] = v[:, 0]
            qg = q.reshape(b, self.n_kv, self.group, self.head_dim)
            if bias is None:
                a = attention.decode_attention(qg, kc, vc, pos, self._scaling(layer))
            else:
                a = F.scaled_dot_product_attention(
                    qg, kc[:b, :, :window], vc[:b, :, :window], attn_mask=bias, scale=self._scaling(layer)
                )
            h, x = fusion.add_rms_norm(
                h, layer.self_attn.o_proj(a.reshape(b, 1, -1)), *rms_args(layer.post_attention_layernorm)
            )
            w_gate_up = self.packs[li][2]
            assert w_gate_up is not None
            gate_up = F.linear(x, w_gate_up, self.packs[li][3])
            following = layers[li + 1].input_layernorm if li + 1 < len(layers) else inner.norm
            h, x = fusion.add_rms_norm(h, layer.mlp.down_proj(fusion.silu_mul(gate_up)), *rms_args(following))
        return x

    def _step(self, b: int, window: int) -> None:
        """Sample token ``step`` of every row from ``logits``, record it, and compute the next logits."""
        ws = self.ws
        assert ws is not None and ws.sampling is not None
        s = ws.sampling_rows(b)
        logits = ws.logits[:b]
        if s.any_blocked:
            block_early_stops(logits, ws.step, s.min_new, s.blocked)
        u = s.draws.index_select(1, ws.step).view(b)
        tok, lp = self.fusion.sample(logits, u, s, scaled=not ws.raw)
        ws.tokens[:b].index_copy_(1, ws.step, tok.view(b, 1))
        ws.logprobs[:b].index_copy_(1, ws.step, lp.view(b, 1))
        ws.tok[:b].copy_(tok)
        if ws.raw:  # the next logits straight into the workspace (the sampler divides them)
            self._decode_forward(b, window, out=ws.logits[:b])
        else:  # the next logits, divided by each row's temperature on their way to float32 (one kernel)
            torch.div(self._decode_forward(b, window), s.temperature.unsqueeze(1), out=ws.logits[:b])
        ws.pos[:b].add_(1).clamp_(max=ws.length - 1)
        ws.step.add_(1)

    def _rehearse(self, run: Callable[[], None]) -> None:
        """Run one step and undo it: the warm-up before a capture, which may come in the middle of a batch.

        A step writes K/V at each row's next slot and records at column ``step``; both are rewritten by the
        real step before anything reads them, so only ``tok``, ``pos``, ``step`` and ``logits`` need restoring.
        """
        ws = self.ws
        assert ws is not None
        saved = [t.clone() for t in (ws.tok, ws.pos, ws.step, ws.logits)]
        run()
        for t, old in zip((ws.tok, ws.pos, ws.step, ws.logits), saved, strict=True):
            t.copy_(old)

    def _drop_graphs(self, ws: Workspace) -> None:
        """Forget captured graphs, and the memory pool they shared.

        Destroying a pool's last graph leaves the pool with no users; capturing
        into that pool again trips torch's allocator (``use_count > 0`` assert),
        so later captures start a fresh pool.
        """
        ws.graphs.clear()
        self._pool = None

    def _graph(self, key: tuple[Any, ...], run: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """Capture ``run`` once for ``key``, after a warm-up on a side stream (lazy initialisation such as
        cuBLAS handles must not be captured)."""
        ws = self.ws
        assert ws is not None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._rehearse(run)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the server's other threads may use CUDA (weight reads) while this one captures
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            run()
        ws.graphs[key] = graph
        return graph

    # ------------------------------------------------------------------ batch life cycle

    def start(
        self, prompts: list[list[int]], sampling: BatchSampling, length: int, want_input: list[bool]
    ) -> tuple[int, list[list[float | None]]]:
        """Prefill ``prompts`` into a workspace of at least ``length`` slots; return (rows, prompt logprobs).

        ``rows`` is the batch bucket (>= len(prompts)); rows past the prompts are idle padding.
        """
        self.refresh()
        n = len(prompts)
        b = bucket(n)
        ws = self._workspace(b, length)
        self._load_sampling(ws, sampling, n)
        assert ws.sampling is not None
        dev = self.device
        lens = [len(p) for p in prompts]
        ws.tok.zero_()
        ws.pos.zero_()
        ws.pos[:n].copy_(torch.tensor(lens))
        ws.step.zero_()
        ws.logits.zero_()
        input_lps: list[list[float | None]] = [[] for _ in range(n)]
        chunk = max(1, 16384 // max(lens))
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            width = max(lens[r0:r1])
            ids = torch.zeros((r1 - r0, width), dtype=torch.long)
            for r in range(r0, r1):
                ids[r - r0, : lens[r]] = torch.tensor(prompts[r])
            ids = ids.to(dev)
            lengths = torch.tensor(lens[r0:r1], device=dev)
            full_h = any(want_input[r0:r1])
            h = self.prefill(ids, lengths, slice(r0, r1), full_h)
            if full_h:
                lp = torch.log_softmax(self.model.lm_head(h).float(), dim=-1)
                for r in range(r0, r1):
                    if want_input[r]:
                        prompt = prompts[r]
                        got = lp[
                            r - r0,
                            torch.arange(lens[r] - 1, device=dev),
                            torch.tensor(prompt[1:], dtype=torch.long, device=dev),
                        ]
                        input_lps[r] = [None, *got.tolist()]
                h = h[torch.arange(r1 - r0, device=dev), lengths - 1]
            if ws.raw:
                ws.logits[r0:r1].copy_(self.model.lm_head(h))
            else:
                temperature = ws.sampling.temperature[r0:r1].unsqueeze(1)
                torch.div(self.model.lm_head(h).float(), temperature, out=ws.logits[r0:r1])
        return b, input_lps

    def step(self, b: int, max_pos: int) -> None:
        """Decode one token for rows ``:b``; ``max_pos`` bounds the live rows' slots (it picks the window)."""
        ws = self.ws
        assert ws is not None and ws.sampling is not None
        window = ws.window(max_pos + 1)
        s = ws.sampling
        key = (b, window, s.any_sampled, s.needs_sort, s.any_blocked)
        if not self.cuda_graphs:
            if self.rehearse and key not in self.rehearsed:  # tests: the capture's warm-up, on any device
                self.rehearsed.add(key)
                self._rehearse(lambda: self._step(b, window))
            self._step(b, window)
            return
        graph = ws.graphs.get(key)
        if graph is None:
            graph = self._graph(key, lambda: self._step(b, window))
        graph.replay()

    def read(self, b: int, s0: int, s1: int) -> tuple[list[list[int]], list[list[float]]]:
        """Tokens and logprobs of steps ``s0..s1-1`` of rows ``:b`` (one host synchronisation)."""
        assert self.ws is not None
        return self.ws.read(b, s0, s1)

    def keep(self, b: int, rows: list[int], new_b: int) -> None:
        """Move rows ``rows`` (of ``:b``) to the front, in that order, so rows ``:new_b`` can be decoded alone."""
        assert self.ws is not None
        self.ws.keep(b, rows)

    def _load_sampling(self, ws: Workspace, sampling: BatchSampling, n: int) -> None:
        """Copy a batch's sampling tensors into the workspace's own; graphs reading outgrown ones go first."""
        if not ws.fits_sampling(sampling):
            self._drop_graphs(ws)
        ws.load_sampling(sampling, n)
