"""Causal attention within each document of a packed row, for both training backends.

A packed micro-batch (``[train] qkv_format = "thd"``, :func:`miles.train.batch.pack`)
puts its sequences ("documents") back to back in one row of ``t`` tokens.
Each document attends causally to itself only. Two ways of getting that are
slow: one SDPA over the whole row under an explicit block-diagonal ``[t, t]``
mask makes every query score every key of the row (on the CPU quickstart's
256 sequences of 11 tokens, a 5x slower FSDP step than padding), and one SDPA
per document is a Python loop of hundreds of kernel launches per layer for an
RL rollout's short responses. :func:`document_attention` takes the row as
``[t, heads, head_dim]`` with the documents' boundaries (:class:`Documents`,
built once per micro-batch and shared by every layer) and runs the fastest
exact kernel this device and torch have (:func:`choose_kernel`):

* ``"varlen"``: torch's variable-length flash attention
  (``torch.nn.attention.varlen.varlen_attn``, torch 2.10+), one launch for the
  whole row, forward and backward, on CUDA in bfloat16/float16 with a head
  dimension that is a multiple of 8 up to 256 on sm80+;
* ``"flex"``: compiled FlexAttention under a document-causal ``BlockMask``
  (built once per micro-batch, blocks outside every document skipped), on
  CUDA for what varlen does not take (float32); FlexAttention has no backward
  on CPU;
* ``"grouped"``: one SDPA per distinct document length, the documents of that
  length stacked as a batch (``[n, heads, len, head_dim]``, exact: a batch row
  is one document). A rollout's responses often share lengths (the quickstart's
  all do), so this is a handful of launches where the loop had hundreds; it is
  the CPU kernel (measured there against the loop and the masked row) and the
  fallback everywhere.

Every kernel computes the same function (softmax over each query's own
document's earlier keys); they differ only in the order of floating-point sums.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch.nn import functional as F

Kernel = Literal["varlen", "flex", "grouped"]
KERNELS: tuple[Kernel, ...] = ("varlen", "flex", "grouped")


class Documents:
    """The documents of one packed row: their lengths (host integers, so no kernel needs a device sync) and the
    tensors the fused kernels take, built once per micro-batch and read by every layer.

    A plain class, not a dataclass: FSDP rebuilds dataclasses found in a module's inputs (to move or cast their
    tensors) before every sharded layer, which would drop what the first layer cached for the others.
    """

    def __init__(self, lens: Sequence[int], device: torch.device | str) -> None:
        self.lens = tuple(int(n) for n in lens)
        if not self.lens or min(self.lens) < 1:
            raise ValueError(f"a packed row needs documents of at least one token, got lengths {list(lens)[:8]}")
        bounds = [0, *itertools.accumulate(self.lens)]
        self.cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
        """``[n + 1]`` int32 on the row's device: where each document starts, then the row's length."""
        self.max_len = max(self.lens)
        self.starts = tuple(bounds[:-1])
        by_length: dict[int, list[int]] = {}
        for i, n in enumerate(self.lens):
            by_length.setdefault(n, []).append(i)
        self.by_length = {n: tuple(ix) for n, ix in by_length.items()}
        """Document indices of each length, in row order (the grouped kernel's batches)."""
        self._gather: dict[int, torch.Tensor] = {}
        self._row_order: torch.Tensor | None = None
        self._block_mask: Any = None

    def __repr__(self) -> str:
        return f"Documents({len(self.lens)} documents, {self.total} tokens, longest {self.max_len})"

    @property
    def total(self) -> int:
        return self.starts[-1] + self.lens[-1]

    def gather_index(self, length: int, device: torch.device) -> torch.Tensor:
        """Row positions of the documents of ``length``, document after document (built on first use)."""
        if length not in self._gather:
            starts = torch.tensor([self.starts[i] for i in self.by_length[length]], dtype=torch.long)
            idx = (starts[:, None] + torch.arange(length)[None, :]).reshape(-1)
            self._gather[length] = idx.to(device)
        return self._gather[length]

    def row_order(self, device: torch.device) -> torch.Tensor:
        """Where each row position sits among the grouped kernel's outputs (its groups' tokens, group after group)."""
        if self._row_order is None:
            grouped = [self.starts[i] + j for n, ix in self.by_length.items() for i in ix for j in range(n)]
            order = torch.empty(len(grouped), dtype=torch.long)
            order[torch.tensor(grouped)] = torch.arange(len(grouped))
            self._row_order = order.to(device)
        return self._row_order

    def block_mask(self, device: torch.device) -> Any:
        """FlexAttention's document-causal ``BlockMask`` of the row (built on first use, then shared by every layer)."""
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            lens = torch.tensor(self.lens, device=device)
            doc = torch.repeat_interleave(torch.arange(len(self.lens), device=device), lens)

            def document_causal(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
                return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

            t = self.total
            self._block_mask = create_block_mask(document_causal, None, None, t, t, device=device, _compile=True)
        return self._block_mask


@functools.cache
def _varlen() -> tuple[Callable[..., Any], frozenset[str]] | None:
    """torch's ``varlen_attn`` and its keyword names, or None on a torch without it (before 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor] | None:
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    # Uncompiled, FlexAttention materialises the scores; compiled, it is one fused kernel that skips masked blocks.
    return torch.compile(flex_attention)  # type: ignore[no-any-return]


def varlen_supports(q: torch.Tensor) -> bool:
    """Whether torch's varlen flash attention takes ``q`` (its flash kernel's device, dtype and head-dim limits)."""
    if not q.is_cuda or torch.version.hip is not None or _varlen() is None:
        return False
    d = q.shape[-1]
    return (
        q.dtype in (torch.float16, torch.bfloat16)
        and d % 8 == 0
        and d <= 256
        and torch.cuda.get_device_capability(q.device) >= (8, 0)
    )


def flex_supports(q: torch.Tensor) -> bool:
    """Whether compiled FlexAttention takes ``q``: CUDA (it has no backward on CPU), a power-of-two head dimension
    from 16 to 256 (its kernel's tile sizes)."""
    d = q.shape[-1]
    return q.is_cuda and _compiled_flex() is not None and 16 <= d <= 256 and d & (d - 1) == 0


def choose_kernel(q: torch.Tensor) -> Kernel:
    """The fastest exact kernel for ``q``'s device, dtype and head dimension (see the module docstring)."""
    if varlen_supports(q):
        return "varlen"
    if flex_supports(q):
        return "flex"
    return "grouped"


def document_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    docs: Documents,
    *,
    scale: float | None = None,
    kernel: Kernel | None = None,
) -> torch.Tensor:
    """Causal attention within each document: ``q [t, heads, d]``, ``k``/``v [t, kv_heads, d]`` (GQA: ``heads`` a
    multiple of ``kv_heads``) -> ``[t, heads, d]``. ``scale`` defaults to ``1/sqrt(d)``; ``kernel`` defaults to
    :func:`choose_kernel`'s."""
    t, heads, d = q.shape
    kv_heads = k.shape[1]
    if t != docs.total or k.shape[0] != t or v.shape[0] != t:
        raise ValueError(f"packed row of {t} queries, {k.shape[0]} keys, documents of {docs.total} tokens")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kernel = kernel or choose_kernel(q)
    if kernel == "varlen":
        return _varlen_attention(q, k, v, docs, scale)
    if kernel == "flex":
        return _flex_attention(q, k, v, docs, scale)
    if kernel == "grouped":
        return _grouped_attention(q, k, v, docs, scale)
    raise ValueError(f"unknown document attention kernel {kernel!r} (known: {', '.join(KERNELS)})")


def _varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents, scale: float) -> torch.Tensor:
    found = _varlen()
    if found is None:
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    varlen_attn, params = found
    kwargs: dict[str, Any] = {"scale": scale}
    # Causality is window_size=(-1, 0) from torch 2.11 on, is_causal=True in 2.10.
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # a varlen_attn that does not declare GQA gets repeated key/value heads
            k, v = _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1])
    cu = docs.cu_seqlens.to(q.device)
    out: torch.Tensor = varlen_attn(q, k, v, cu, cu, docs.max_len, docs.max_len, **kwargs)
    return out


def _flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents, scale: float) -> torch.Tensor:
    flex = _compiled_flex()
    if flex is None:
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.attention.flex_attention")
    mask = docs.block_mask(q.device)
    gqa = k.shape[1] != q.shape[1]
    # [t, heads, d] -> [1, heads, t, d] and back
    out = flex(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        block_mask=mask,
        scale=scale,
        enable_gqa=gqa,
    )
    return out[0].transpose(0, 1)


def _repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[..., kv_heads, d]`` -> ``[..., heads, d]``, each key/value head serving its group of query heads."""
    return x.repeat_interleave(heads // x.shape[-2], dim=-2)


def _grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents, scale: float
) -> torch.Tensor:
    heads, d = q.shape[1], q.shape[2]
    # CPU SDPA shares key/value heads itself; CUDA's memory-efficient kernel does not, so it gets them repeated.
    native_gqa = q.device.type == "cpu" and k.shape[1] != heads
    outs: list[torch.Tensor] = []
    in_row_order = True  # the groups' outputs, concatenated, are the row itself (no scatter back)
    covered = 0
    for n, members in docs.by_length.items():
        m = len(members)
        first = docs.starts[members[0]]
        if docs.starts[members[-1]] - first == (m - 1) * n:  # consecutive in the row: a view, no gather
            qg, kg, vg = (x[first : first + m * n] for x in (q, k, v))
            in_row_order = in_row_order and first == covered
        else:
            idx = docs.gather_index(n, q.device)
            qg, kg, vg = (x.index_select(0, idx) for x in (q, k, v))
            in_row_order = False
        covered += m * n
        # [m * n, h, d] -> [m, h, n, d]: each batch row is one document, so a plain causal mask is exact
        qg = qg.view(m, n, heads, d).transpose(1, 2)
        kg, vg = kg.view(m, n, -1, d), vg.view(m, n, -1, d)
        if not native_gqa:
            kg, vg = _repeat_heads(kg, heads), _repeat_heads(vg, heads)
        out = F.scaled_dot_product_attention(
            qg, kg.transpose(1, 2), vg.transpose(1, 2), is_causal=n > 1, scale=scale, enable_gqa=native_gqa
        )
        outs.append(out.transpose(1, 2).reshape(m * n, heads, d))
    grouped = outs[0] if len(outs) == 1 else torch.cat(outs)
    if in_row_order:
        return grouped
    return grouped.index_select(0, docs.row_order(q.device))
