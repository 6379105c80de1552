"""Per-document attention of a packed row against one SDPA per document, forward and backward.

Both sides compute each document's causal softmax attention in float32; they differ only in the order of the
float32 sums (another kernel, another batching), so they agree within the reordering bound of
:func:`_bounds`. The CUDA kernels (varlen flash attention in bfloat16, FlexAttention) run on a GPU machine
(``pytest -m gpu``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from miles.train.document_attention import Documents, choose_kernel, document_attention

EPS32 = torch.finfo(torch.float32).eps
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
# Length 1 (a lone token), lengths shared by consecutive documents (a view) and by scattered ones (a gather).
LENS = [5, 1, 9, 9, 3, 1, 17, 5, 9, 2, 33, 1]


def per_document_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """The reference: one causal SDPA per document, key/value heads repeated for their query-head groups."""
    rep = q.shape[1] // k.shape[1]
    outs = []
    for qd, kd, vd in zip(q.split(lens), k.split(lens), v.split(lens), strict=True):
        out = F.scaled_dot_product_attention(
            qd.transpose(0, 1),
            kd.repeat_interleave(rep, 1).transpose(0, 1),
            vd.repeat_interleave(rep, 1).transpose(0, 1),
            is_causal=qd.shape[0] > 1,
        )
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


def _inputs(lens: list[int], dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    shapes = [(t, HEADS, HEAD_DIM), (t, KV_HEADS, HEAD_DIM), (t, KV_HEADS, HEAD_DIM), (t, HEADS, HEAD_DIM)]
    return [torch.randn(s, generator=g).to(device, dtype) for s in shapes]  # q, k, v, and the output's gradient


def _bounds(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, lens: list[int], eps: float) -> dict:
    """Elementwise bounds on how far two orders of the same float sums may move each output (first order).

    The recursive-summation bound: a sum of ``m`` terms moves by at most ``m * eps`` times the sum of its
    terms' magnitudes when reordered; both sides carry such an error, hence the factors 2. So each quantity's
    bound is its computation redone on magnitudes (in float64) times the relative error its sums allow: a
    score is a ``d``-term dot product (``e_s = 2 d eps`` of ``|q|.|k|``); a softmax weight moves relatively by
    twice its row's largest score move plus its ``n``-term denominator (``e_w``); an output is an ``n``-term
    weighted sum of values; backward, ``dv`` sums ``n`` weights times upstream gradients, ``dp = g.v`` and
    ``D = g.out`` are ``d``-term dot products, ``dS = w (dp - D)``, and ``dq``/``dk`` sum ``n`` of those times
    keys/queries times the scale (``dk``/``dv`` also over the query heads sharing a key/value head).
    """
    q, k, v, g = (x.detach().double().cpu() for x in (q, k, v, g))
    t, heads, d = q.shape
    rep = heads // k.shape[1]
    scale = 1.0 / math.sqrt(d)
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    pos = torch.arange(t)
    visible = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    n = torch.tensor(lens, dtype=torch.float64)[doc]  # each query's document length
    q64, g64 = q.double().transpose(0, 1), g.double().transpose(0, 1)  # [h, t, d]
    k64 = k.double().repeat_interleave(rep, 1).transpose(0, 1)
    v64 = v.double().repeat_interleave(rep, 1).transpose(0, 1)
    w = torch.softmax((q64 @ k64.transpose(1, 2) * scale).masked_fill(~visible, -math.inf), -1)
    out = w @ v64
    score_move = 2 * d * eps * (q64.abs() @ k64.abs().transpose(1, 2) * scale) * visible
    e_w = 2 * score_move.amax(-1, keepdim=True) + 2 * (2 * n[:, None] + 2) * eps  # [h, t, 1]
    e_sum = 2 * (d + 2 * n[:, None] + 2) * eps
    out_b = (e_w + 2 * n[:, None] * eps) * (w @ v64.abs())
    dv_b = ((e_w + 2 * n[:, None] * eps) * w).transpose(1, 2) @ g64.abs()
    a = w * (g64.abs() @ v64.abs().transpose(1, 2) + (g64.abs() * out.abs()).sum(-1, keepdim=True))
    dq_b = scale * ((e_w + e_sum) * a) @ k64.abs()
    dk_b = scale * ((e_w + e_sum) * a).transpose(1, 2) @ q64.abs()

    def kv(x: torch.Tensor) -> torch.Tensor:  # [heads, t, d] -> [t, kv_heads, d], summed over each head group
        return x.transpose(0, 1).reshape(t, -1, rep, d).sum(2)

    return {"out": out_b.transpose(0, 1), "dq": dq_b.transpose(0, 1), "dk": kv(dk_b), "dv": kv(dv_b)}


def _run(kernel: str | None, lens: list[int], dtype: torch.dtype, device: str) -> tuple[dict, dict, dict]:
    q, k, v, g = _inputs(lens, dtype, device)
    results = []
    for fn in (
        lambda a, b, c: document_attention(a, b, c, Documents(lens, device), kernel=kernel),  # type: ignore[arg-type]
        lambda a, b, c: per_document_sdpa(a, b, c, lens),
    ):
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(g)
        results.append({"out": out.detach(), **{n: x.grad for n, x in zip(("dq", "dk", "dv"), leaves, strict=True)}})
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else EPS32
    return results[0], results[1], _bounds(q, k, v, g, lens, eps)


@pytest.mark.parametrize("lens", [LENS, [11] * 24, [1] * 7, [40]], ids=["mixed", "equal", "ones", "single"])
def test_grouped_kernel_equals_per_document_sdpa(lens: list[int]) -> None:
    got, want, bound = _run("grouped", lens, torch.float32, "cpu")
    for name in ("out", "dq", "dk", "dv"):
        assert got[name].shape == want[name].shape
        err = (got[name] - want[name]).double().abs()
        assert (err <= bound[name]).all(), (name, float(err.max()), float(bound[name].max()))


def test_documents_never_see_each_other() -> None:
    """Changing one document's keys and values changes no other document's output."""
    q, k, v, _ = _inputs(LENS, torch.float32, "cpu")
    docs = Documents(LENS, "cpu")
    base = document_attention(q, k, v, docs, kernel="grouped")
    start, n = docs.starts[2], LENS[2]
    k2, v2 = k.clone(), v.clone()
    k2[start : start + n] += 1.0
    v2[start : start + n] -= 1.0
    moved = document_attention(q, k2, v2, docs, kernel="grouped")
    changed = (moved - base).abs().amax(dim=(1, 2)) > 0
    assert changed[start : start + n].all()
    assert not changed[:start].any() and not changed[start + n :].any()


def test_cpu_chooses_the_grouped_kernel() -> None:
    """varlen is CUDA's flash kernel and FlexAttention has no backward on CPU."""
    assert choose_kernel(torch.zeros(4, HEADS, HEAD_DIM)) == "grouped"


def test_mismatched_rows_and_empty_documents_are_refused() -> None:
    q, k, v, _ = _inputs([3, 4], torch.float32, "cpu")
    with pytest.raises(ValueError, match="documents of 8 tokens"):
        document_attention(q, k, v, Documents([3, 5], "cpu"))
    with pytest.raises(ValueError, match="at least one token"):
        Documents([3, 0, 4], "cpu")
    with pytest.raises(ValueError, match="not a multiple"):
        document_attention(q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), Documents([3, 4], "cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine: pytest -m gpu)")
@pytest.mark.parametrize(
    ("kernel", "dtype"),
    [("varlen", torch.bfloat16), ("flex", torch.float32), ("grouped", torch.float32)],
    ids=["varlen-bf16", "flex-fp32", "grouped-fp32"],
)
@pytest.mark.parametrize("lens", [LENS, [11] * 24], ids=["mixed", "equal"])
def test_cuda_kernels_equal_per_document_sdpa(kernel: str, dtype: torch.dtype, lens: list[int]) -> None:
    """Each CUDA kernel against the per-document loop in the same dtype; the automatic choice is varlen for
    bfloat16 and FlexAttention for float32 (head dim 16)."""
    q = torch.zeros(1, HEADS, HEAD_DIM, dtype=dtype, device="cuda")
    expected = "varlen" if dtype == torch.bfloat16 else "flex"
    assert choose_kernel(q) == expected
    got, want, bound = _run(kernel, lens, dtype, "cuda")
    for name in ("out", "dq", "dk", "dv"):
        err = (got[name].double() - want[name].double()).abs().cpu()
        assert (err <= bound[name]).all(), (name, float(err.max()), float(bound[name].max()))


def test_fsdp_passes_documents_through_with_their_caches() -> None:
    """FSDP rebuilds the containers of a sharded layer's inputs (dataclasses included) before every layer, to move
    or cast their tensors: a row's Documents must reach every layer as the same object, so that what one layer
    builds (the grouped kernel's gather indices, FlexAttention's block mask) serves the others."""
    from torch.distributed.utils import _apply_to_tensors

    docs = Documents(LENS, "cpu")
    docs.gather_index(9, torch.device("cpu"))
    kwargs = _apply_to_tensors(lambda t: t.clone(), {"documents": docs, "position_ids": torch.zeros(3)})
    assert kwargs["documents"] is docs
