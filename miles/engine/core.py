"""The embedded engine: batched generation with a KV cache over any HF causal LM directory.

Where SGLang is absent (a laptop, CPU CI, a small GPU job) miles still needs an
inference engine that speaks SGLang's protocol, so that the trainer, the weight
sync and the tests run one code path. This module is the compute half; the
HTTP half is :mod:`miles.engine.server`.

How it generates: a batch of prompts is prefilled in one forward pass, then
decoded one token per step for every row at once. Two paths do this:

* :class:`~miles.engine.decoder.StaticDecoder` (Llama-family models: qwen2,
  qwen3, llama, mistral): preallocated per-layer KV buffers, one fixed-shape
  decode step per batch bucket and attention window, captured as a CUDA graph
  on GPUs, with sampling on the device;
* HF's own forward with a ``DynamicCache`` and left padding, for every other
  model (or ``decoder="hf"``).

Both are driven through one stepping interface (:mod:`miles.engine.decode_batch`);
this module owns the loop around it.

Either way the device records each step's tokens and logprobs and the host
reads them back only every ``SYNC_EVERY`` steps (or when the first row
exhausts its budget, when no row can stop early), then applies the stop rules
token by token: the outputs are those of a per-token check, and tokens a row
produced after its end are discarded. Finished rows are compacted away at those
points once the live rows fit a smaller batch (the HF path drops them from its
cache, ``batch_select_indices``).

Sampling follows SGLang 0.5.20 (``sglang/srt/layers/sampler.py``):

* temperature < 1e-6 or top_k == 1 is greedy (argmax);
* otherwise probabilities are ``softmax(logits / temperature)``, filtered by
  top_p then top_k, and sampled by inverse CDF with one uniform draw per token:
  the k-th token uses the k-th number of the request's own ``torch.Generator``,
  seeded with ``sampling_seed`` (or a draw from the engine's seeded generator).
  All of a request's draws are made when its batch starts, so the device needs
  no host input per step. The same request with the same seed and weights
  yields the same tokens (on the same device, dtype and decode path);
* the returned logprob of each sampled token is ``log softmax(logits /
  temperature)`` over the whole vocabulary, before top-k/top-p renormalisation
  (what SGLang returns by default, i.e. without
  ``SGLANG_RETURN_ORIGINAL_LOGPROB``); greedy rows use temperature 1. This is
  the distribution the trainer recomputes with ``logits / rollout_temperature``.

Bitwise batch invariance is not promised: a row's numbers may differ in the last
bits with the batch it was computed in. A batched ``/generate`` request is run as
one batch, so a client that sends fixed chunks gets reproducible rollouts.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from miles.engine.decode_batch import DecodeBatch, HFBatch, StaticBatch
from miles.engine.decoder import StaticDecoder
from miles.engine.sampling import BatchSampling, SamplingParams
from miles.model.checkpoint_names import FusedTargets, to_checkpoint_names
from miles.transfer.checksum import tensor_checksum

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SYNC_EVERY = 16
"""Decode steps between reads of the sampled tokens while some row may stop early (EOS, stop ids/strings)."""

DECODERS = ("auto", "static", "hf")


@dataclass
class GenerationRequest:
    """One prompt to complete (``n`` > 1 is expanded by the server before it gets here)."""

    input_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    logprob_start_len: int = -1
    """SGLang's ``logprob_start_len``: -1 returns no prompt logprobs, k >= 0 those of prompt positions k..end."""


@dataclass
class GenerationOutput:
    """What SGLang's /generate reports for one request."""

    output_ids: list[int]
    output_logprobs: list[float]
    finish_reason: dict[str, Any]
    text: str
    input_logprobs: list[float | None] = field(default_factory=list)
    """Logprobs of prompt tokens from ``logprob_start_len`` (the first prompt token has None)."""


class EngineReleased(RuntimeError):
    """Generation was asked for while the engine's memory is released (release_memory_occupation)."""


class Engine:
    """A loaded model plus its tokenizer, generating batches; thread-safe for one generating thread.

    ``decoder``: ``"auto"`` runs :class:`StaticDecoder` when the model is one it supports, else HF's forward;
    ``"static"`` insists on it (ValueError naming why not); ``"hf"`` always uses HF's forward.
    ``cuda_graphs``: on CUDA, capture the static path's decode step (off: the same kernels, launched eagerly).
    ``fuse``: compile the static path's elementwise chains and sampling into fused Triton kernels
    (:mod:`miles.engine.fusion`); None fuses where it can run (CUDA with Triton), True insists.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        seed: int = 0,
        max_batch_size: int = 64,
        trust_remote_code: bool = False,
        decoder: str = "auto",
        cuda_graphs: bool = True,
        fuse: bool | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder {decoder!r} is not one of {DECODERS}")
        self.model_dir = str(model_dir)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # NCCL weight-update groups use the current device
        self.dtype = DTYPES[dtype]
        self.max_batch_size = max_batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=trust_remote_code)
        model: Any = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=self.dtype, trust_remote_code=trust_remote_code
        )
        self.model = model.to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)
        cfg = self.model.config
        self.config = cfg
        self.vocab_size = int(cfg.vocab_size)
        self.max_context = int(getattr(cfg, "max_position_embeddings", 1 << 30) or 1 << 30)
        self.eos_ids = self._eos_ids()
        # transformers renamed the forward's ``past_key_values`` to ``cache``; use whichever this version has
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0))
        self._seed_gen = torch.Generator().manual_seed(seed)
        self.gate = threading.Event()
        """Cleared by pause_generation (in_place/retract): the generating thread waits at the next step."""
        self.gate.set()
        self.parked = threading.Event()
        """Set while the generating thread waits at the gate (a paused engine may then take new weights)."""
        self.abort = threading.Event()
        """Set by pause_generation (abort): running rows finish at the next step with finish_reason abort."""
        self.cancelled: set[int] = set()
        """Positions in the running ``generate`` call's requests to abort at the next step (``/abort_request``
        by rid); the server empties it before each call."""
        self.released: set[str] = set()
        self._cpu_backup: dict[str, torch.Tensor] = {}
        why_not = StaticDecoder.unsupported(self.model)
        if decoder == "static" and why_not:
            raise ValueError(f"decoder 'static' cannot run {self.model_dir}: {why_not}")
        self._decoding = False
        self.decoder: StaticDecoder | None = None
        """The fast decode path (static KV cache, CUDA graphs); None: HF's forward with a DynamicCache."""
        if decoder != "hf" and why_not is None:
            self.decoder = StaticDecoder(self.model, self.device, cuda_graphs=cuda_graphs, fuse=fuse)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(i) for i in src)
        gen_cfg = getattr(self.model, "generation_config", None)
        gen_eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, (list, tuple)):
            ids.update(int(i) for i in gen_eos)
        return ids

    # ------------------------------------------------------------------ generation

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        """Generate every request, in batches of at most ``max_batch_size``, in order."""
        if self.released:
            raise EngineReleased(f"engine memory is released ({sorted(self.released)}); call resume_memory_occupation")
        outputs: list[GenerationOutput] = []
        for start in range(0, len(requests), self.max_batch_size):
            outputs.extend(self._generate_batch(list(requests[start : start + self.max_batch_size])))
        return outputs

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def _check_request(self, r: GenerationRequest) -> None:
        if not r.input_ids:
            raise ValueError("input_ids is empty")
        if len(r.input_ids) >= self.max_context:
            raise ValueError(
                f"The input ({len(r.input_ids)} tokens) is longer than the model's context length ({self.max_context} "
                "tokens)."
            )
        bad = [t for t in r.input_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"input_ids out of vocabulary range [0, {self.vocab_size}): {bad[:5]}")

    @torch.inference_mode()
    def _generate_batch(self, reqs: list[GenerationRequest]) -> list[GenerationOutput]:
        for r in reqs:
            self._check_request(r)
        n = len(reqs)
        params = [r.params for r in reqs]
        budget = [min(p.max_new_tokens, self.max_context - len(r.input_ids)) for p, r in zip(params, reqs, strict=True)]
        active = [i for i in range(n) if budget[i] > 0]
        if self.decoder is not None and active:
            cap = self.decoder.max_rows(max(len(reqs[i].input_ids) + budget[i] for i in active))
            if len(active) > cap:  # the KV cache of the whole batch would not fit: split it, in order
                return [o for k in range(0, n, cap) for o in self._generate_batch(reqs[k : k + cap])]
        seeds = [
            p.sampling_seed
            if p.sampling_seed is not None
            else int(torch.randint(0, 2**62, (1,), generator=self._seed_gen))
            for p in params
        ]
        out_ids: list[list[int]] = [[] for _ in range(n)]
        out_lps: list[list[float]] = [[] for _ in range(n)]
        finish: list[dict[str, Any] | None] = [None] * n
        for i in range(n):
            if budget[i] <= 0:
                finish[i] = {"type": "length", "length": params[i].max_new_tokens}
        input_lps: list[list[float | None]] = [[] for _ in range(n)]
        if not active:
            return self._outputs(reqs, out_ids, out_lps, finish, input_lps)

        steps = max(budget[i] for i in active)
        sampling = BatchSampling.build(
            [params[i] for i in active],
            [seeds[i] for i in active],
            [budget[i] for i in active],
            self.eos_ids,
            self.vocab_size,
            steps,
        )
        prompts = [reqs[i].input_ids for i in active]
        want = [reqs[i].logprob_start_len >= 0 for i in active]
        batch: DecodeBatch
        if self.decoder is not None:
            batch = StaticBatch(
                self.decoder, prompts, sampling, want, max(len(reqs[i].input_ids) + budget[i] for i in active)
            )
        else:
            batch = HFBatch(
                self.model, self._cache_kw, self.device, self.pad_id, prompts, sampling.to(self.device), want, steps
            )
        for row, i in enumerate(active):
            if want[row]:
                input_lps[i] = batch.input_logprobs[row][reqs[i].logprob_start_len :]
        self._decoding = True
        try:
            self._decode(batch, reqs, active, budget, out_ids, out_lps, finish)
        finally:
            self._decoding = False
        return self._outputs(reqs, out_ids, out_lps, finish, input_lps)

    def _decode(
        self,
        batch: DecodeBatch,
        reqs: list[GenerationRequest],
        active: list[int],
        budget: list[int],
        out_ids: list[list[int]],
        out_lps: list[list[float]],
        finish: list[dict[str, Any] | None],
    ) -> None:
        """Step ``batch`` until every row finished, reading tokens back only every few steps.

        The device records each step's tokens; the host reads them at a sync point and applies the stop rules
        (EOS, stop ids, stop strings, budget) token by token, so the outcome is the same as checking every step.
        Tokens a finished row produced after its end are discarded. Sync points come every ``SYNC_EVERY`` steps
        while some row can stop early, else when the first row exhausts its budget; at each, finished rows are
        compacted away once the live rows fit a smaller batch bucket.
        """
        params = [r.params for r in reqs]
        window = [max((len(s) for s in p.stop), default=0) + 2 for p in params]
        b = batch.rows
        slots: list[int | None] = [*active, *([None] * (b - len(active)))]
        step = read = 0

        def drain() -> None:
            nonlocal read
            if read == step:
                return
            toks, lps = batch.read(b, read, step)
            for row, i in enumerate(slots):
                if i is not None and self._take(
                    params[i], out_ids[i], out_lps[i], toks[row], lps[row], budget[i], window[i], finish, i
                ):
                    slots[row] = None
            read = step

        def next_sync() -> int:
            live = [i for i in slots if i is not None]
            left = min(budget[i] - len(out_ids[i]) for i in live)
            early = any(
                params[i].stop or params[i].stop_token_ids or (self.eos_ids and not params[i].ignore_eos) for i in live
            )
            return step + (min(left, SYNC_EVERY) if early else left)

        sync_at = next_sync()
        longest = max(len(reqs[i].input_ids) for i in active)
        while True:
            if not self.gate.is_set():
                drain()  # also waits for the device: a parked engine has no kernel in flight
                self.parked.set()
                self.gate.wait()
                self.parked.clear()
                batch.refresh()
                if all(i is None for i in slots):
                    return
            if self.abort.is_set():
                drain()
                for i in slots:
                    if i is not None:
                        finish[i] = {
                            "type": "abort",
                            "message": "Abort before prefill" if step == 0 else "Aborted by pause_generation",
                            "status_code": None,
                            "err_type": None,
                        }
                return
            if self.cancelled and any(i in self.cancelled for i in slots if i is not None):
                drain()
                for row, i in enumerate(slots):
                    if i is not None and i in self.cancelled:
                        finish[i] = {
                            "type": "abort",
                            "message": "Aborted by /abort_request",
                            "status_code": None,
                            "err_type": None,
                        }
                        slots[row] = None
                if all(i is None for i in slots):
                    return
            batch.step(b, longest + step)  # the highest KV slot a live row writes in this step
            step += 1
            if step < sync_at:
                continue
            drain()
            keep = [row for row, i in enumerate(slots) if i is not None]
            if not keep:
                return
            new_b = batch.bucket(len(keep))
            if new_b < b:
                batch.keep(b, keep, new_b)
                slots = [slots[row] for row in keep] + [None] * (new_b - len(keep))
                b = new_b
            longest = max(len(reqs[i].input_ids) for i in slots if i is not None)
            sync_at = next_sync()

    def _take(
        self,
        p: SamplingParams,
        ids: list[int],
        lps: list[float],
        new_ids: list[int],
        new_lps: list[float],
        budget: int,
        window: int,
        finish: list[dict[str, Any] | None],
        i: int,
    ) -> bool:
        """Append a row's newly read tokens up to where it finishes; True when it finished.

        Without stop strings only the last token matters to :meth:`_finished`, so the first stopping token is
        found by a scan and the tokens are appended at once (a batch of 256 x 128 tokens would otherwise spend
        tens of milliseconds here); with stop strings every token is checked, as the text must be decoded.
        """
        if p.stop:
            for tok, lp in zip(new_ids, new_lps, strict=True):
                ids.append(tok)
                lps.append(lp)
                finish[i] = self._finished(p, ids, budget, window)
                if finish[i] is not None:
                    return True
            return False
        take = min(len(new_ids), budget - len(ids))
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
        if stops:
            done = len(ids)
            for k in range(take):
                if new_ids[k] in stops and (done + k + 1 > p.min_new_tokens or done + k + 1 == budget):
                    take = k + 1
                    break
        ids.extend(new_ids[:take])
        lps.extend(new_lps[:take])
        finish[i] = self._finished(p, ids, budget, window)
        return finish[i] is not None

    def _finished(self, p: SamplingParams, ids: list[int], budget: int, window: int) -> dict[str, Any] | None:
        tok = ids[-1]
        if len(ids) > p.min_new_tokens or len(ids) == budget:
            if not p.ignore_eos and tok in self.eos_ids:
                return {"type": "stop", "matched": tok}
            if tok in p.stop_token_ids:
                return {"type": "stop", "matched": tok}
            if p.stop:
                tail = self.tokenizer.decode(ids[-window:], skip_special_tokens=p.skip_special_tokens)
                for s in p.stop:
                    if s and s in tail:
                        return {"type": "stop", "matched": s}
        if len(ids) >= budget:
            return {"type": "length", "length": p.max_new_tokens if budget == p.max_new_tokens else budget}
        return None

    def _outputs(
        self,
        reqs: list[GenerationRequest],
        out_ids: list[list[int]],
        out_lps: list[list[float]],
        finish: list[dict[str, Any] | None],
        input_lps: list[list[float | None]],
    ) -> list[GenerationOutput]:
        results = []
        for i, r in enumerate(reqs):
            p = r.params
            reason = finish[i] or {"type": "length", "length": p.max_new_tokens}
            ids = out_ids[i]
            matched = reason.get("matched")
            text_ids = (
                ids[:-1] if isinstance(matched, int) and not p.no_stop_trim and ids and ids[-1] == matched else ids
            )
            text = str(self.tokenizer.decode(text_ids, skip_special_tokens=p.skip_special_tokens))
            if isinstance(matched, str) and not p.no_stop_trim and matched in text:
                text = text[: text.index(matched)]
            results.append(GenerationOutput(ids, out_lps[i], reason, text, input_lps[i]))
        return results

    # ------------------------------------------------------------------ weights

    def state(self) -> dict[str, torch.Tensor]:
        """HF-named tensors (tied aliases included), the names weight sync and checkpoints use."""
        return dict(self.model.state_dict())

    @torch.no_grad()
    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy tensors into the model by checkpoint (HF) name, casting to the engine's dtype; returns the count.

        Senders use checkpoint names (SGLang's contract). Where transformers holds
        several of them in one fused parameter (Qwen3-MoE experts), each lands in
        its own elements of it (:class:`miles.model.checkpoint_names.FusedTargets`).
        """
        state = self.state()
        count = 0
        batched: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for name, tensor in named:
            where = self._fused_targets().locate(name) if name not in state else None
            if where is not None:
                fused_name, idx = where
                if tuple(idx.shape) != tuple(tensor.shape):
                    raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} != engine's {tuple(idx.shape)}")
                target = state[fused_name]
                target.view(-1)[idx.reshape(-1).to(target.device)] = tensor.reshape(-1).to(target.device, target.dtype)
                count += 1
                continue
            if name not in state:
                raise KeyError(f"weight {name!r} is not a parameter of the engine's model ({len(state)} names)")
            target = state[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} != engine's {tuple(target.shape)}")
            if tensor.device == target.device and tensor.dtype == target.dtype:
                batched[0].append(target)  # copied together below (one multi-tensor launch on a GPU)
                batched[1].append(tensor)
            else:
                target.copy_(tensor.to(device=target.device))
            count += 1
        if batched[0]:
            torch._foreach_copy_(batched[0], batched[1])
        return count

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[Any]:
        """SGLang's /get_weights_by_name value: the tensor as float32 lists, first ``truncate_size`` rows."""
        state = self.state()
        if name not in state:
            raise KeyError(f"no weight named {name!r}")
        values: list[Any] = state[name].detach().to("cpu", torch.float32).numpy().tolist()
        return values[:truncate_size]

    def checksums(self) -> dict[str, str]:
        """Checksums under checkpoint names, the names the actor's weights are sent and checked under."""

        return {name: tensor_checksum(t) for name, t in to_checkpoint_names(self.model, self.state().items())}

    def _fused_targets(self) -> Any:
        if getattr(self, "_fused", None) is None:
            self._fused = FusedTargets(self.model)
        return self._fused

    # ------------------------------------------------------------------ memory

    def release(self, tags: list[str] | None) -> None:
        """Release memory (SGLang tags ``weights``, ``kv_cache``).

        The static decode path's KV workspace, CUDA graphs and packed weight copies
        are freed for either tag (unless a paused batch still holds them) and rebuilt
        at the next batch; ``weights`` moves the parameters to host memory when the
        engine is on an accelerator (on a CPU there is nothing to free and the
        weights stay). Generation is refused until resumed.
        """
        tags = list(tags or ["weights", "kv_cache"])
        if self.decoder is not None and not self._decoding:
            self.decoder.drop()
        if "weights" in tags and "weights" not in self.released and self.device.type != "cpu":
            self.model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.released.update(tags)

    def resume(self, tags: list[str] | None) -> None:
        tags = list(tags or ["weights", "kv_cache"])
        if "weights" in tags and "weights" in self.released and self.device.type != "cpu":
            self.model.to(self.device)
        self.released.difference_update(tags)
