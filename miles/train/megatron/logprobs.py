"""Log-probabilities and entropy from vocabulary-parallel logits, without gathering the vocabulary.

Under tensor parallelism each rank holds logits for ``V / tp`` vocabulary
entries. Gathering them would cost ``B * T * V`` floats per rank; instead three
scalars per token are reduced over the TP group: the max (for stability), the
softmax normaliser and the target's logit, plus ``sum(p * logit)`` for the
entropy. The reductions go through Megatron's
``reduce_from_tensor_model_parallel_region`` (all-reduce forward, identity
backward): every TP rank computes the same loss from the reduced values and
back-propagates into its own vocabulary slice, which is exactly the slice of
the full gradient it owns.

The result equals :func:`miles.algo.loss.logprobs_and_entropy` on the gathered
logits (same temperature convention), which the tests check at TP=2.

``chunked=True`` (``[perf] fused_kernels``) computes the same quantities with
a hand-written backward (:class:`_ChunkedLogprobEntropy`): autograd through
the plain formulas keeps several float32 ``[tokens, V/tp]`` tensors alive per
micro-batch (1 GiB each for 2048 tokens of a 128k vocabulary) and runs a
dozen passes over them; the chunked path keeps only the logits themselves
and per-token scalars, and recomputes the softmax of a few hundred tokens at
a time in the backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

CHUNK_ELEMENTS = 1 << 24
"""Float32 elements of one chunk's temporaries (64 MiB): rows per chunk = this / local vocabulary."""


def vocab_parallel_logprobs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    temperature: float = 1.0,
    group: dist.ProcessGroup | None = None,
    chunked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, entropy)`` ``[...]`` float32 from this rank's logits slice ``[..., V_local]``.

    ``vocab_start`` is the global id of this rank's first column; columns at
    or beyond ``vocab_size`` (the padding that makes the vocabulary divide by
    TP) are excluded from the distribution. ``group=None`` with one rank (or
    no process group) means no tensor parallelism. ``chunked`` selects the
    memory-lean path (same values; gradients equal within float rounding).
    """
    tp = dist.get_world_size(group) if dist.is_initialized() else 1
    valid = min(max(vocab_size - vocab_start, 0), logits.shape[-1])
    if chunked and valid > 0:
        lp, ent = _ChunkedLogprobEntropy.apply(
            logits, targets, vocab_start, valid, temperature, group if tp > 1 else None
        )
        return lp, ent

    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    def reduce(t: torch.Tensor) -> torch.Tensor:
        return reduce_from_tensor_model_parallel_region(t) if tp > 1 else t

    x = logits.to(torch.float32)
    if temperature > 0 and temperature != 1.0:
        x = x / temperature
    local = x.shape[-1]
    ids = torch.arange(vocab_start, vocab_start + local, device=x.device)
    padding = ids >= vocab_size
    has_padding = bool(padding.any())
    if has_padding:
        x = x.masked_fill(padding, float("-inf"))

    with torch.no_grad():
        peak = x.max(dim=-1).values
        if tp > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    shifted = x - peak.unsqueeze(-1)
    exp = shifted.exp()
    norm = reduce(exp.sum(-1))
    log_norm = norm.log()

    local_t = targets - vocab_start
    in_range = (local_t >= 0) & (local_t < local)
    picked = torch.gather(shifted, -1, local_t.clamp(0, local - 1).unsqueeze(-1)).squeeze(-1)
    picked = reduce(torch.where(in_range, picked, torch.zeros_like(picked)))
    logp = picked - log_norm

    finite = shifted.masked_fill(padding, 0.0) if has_padding else shifted
    weighted = reduce((exp * finite).sum(-1))
    entropy = log_norm - weighted / norm
    return logp, entropy


def _scaled(x: torch.Tensor, temperature: float) -> torch.Tensor:
    x = x.to(torch.float32)
    return x / temperature if temperature > 0 and temperature != 1.0 else x


class _ChunkedLogprobEntropy(torch.autograd.Function):
    """Log-prob of the target and entropy per row, over this rank's ``valid`` leading vocabulary columns.

    Vocabulary padding sits at the end of the global vocabulary, so on every
    rank the real columns are a prefix (``valid`` of them) and the padding is
    left out by slicing instead of masking. With ``x = logits / T``,
    ``p = softmax(x)`` and ``H = -sum p log p``: ``d logp_t / dx = onehot_t - p``
    and ``dH / dx = -p (log p + H)``. Under TP every rank receives the same
    output gradients (the loss is computed identically on every rank) and
    writes its own slice of the input gradient, as with the identity backward
    of Megatron's reduce region in the plain path.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,
        targets: torch.Tensor,
        vocab_start: int,
        valid: int,
        temperature: float,
        group: dist.ProcessGroup | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shape = logits.shape[:-1]
        x2 = logits.reshape(-1, logits.shape[-1])
        tgt = (targets.reshape(-1) - vocab_start).to(torch.long)
        rows = x2.shape[0]
        step = max(1, CHUNK_ELEMENTS // max(valid, 1))
        peak = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for a in range(0, rows, step):
            peak[a : a + step] = _scaled(x2[a : a + step, :valid].max(dim=-1).values, temperature)
        if group is not None:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        sums = torch.zeros(3, rows, dtype=torch.float32, device=logits.device)  # sum exp, sum exp*s, target s
        in_range = (tgt >= 0) & (tgt < valid)
        local_t = tgt.clamp(0, valid - 1)
        for a in range(0, rows, step):
            b = min(rows, a + step)
            s = _scaled(x2[a:b, :valid], temperature) - peak[a:b, None]
            e = s.exp()
            sums[0, a:b] = e.sum(-1)
            sums[1, a:b] = (e * s).sum(-1)
            sums[2, a:b] = torch.gather(s, 1, local_t[a:b, None]).squeeze(1)
        sums[2].masked_fill_(~in_range, 0.0)
        if group is not None:
            dist.all_reduce(sums, group=group)
        log_norm = sums[0].log()
        logp = sums[2] - log_norm
        entropy = log_norm - sums[1] / sums[0]
        ctx.save_for_backward(logits, local_t, in_range, peak + log_norm, entropy)
        ctx.meta = (valid, temperature, step)
        ctx.set_materialize_grads(False)
        return logp.reshape(shape), entropy.reshape(shape)

    @staticmethod
    def backward(ctx: Any, g_lp: torch.Tensor | None, g_ent: torch.Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        logits, local_t, in_range, lse, entropy = ctx.saved_tensors
        valid, temperature, step = ctx.meta
        x2 = logits.reshape(-1, logits.shape[-1])
        rows = x2.shape[0]
        grad = torch.zeros_like(x2)
        glp = g_lp.reshape(-1).to(torch.float32) if g_lp is not None else None
        gent = g_ent.reshape(-1).to(torch.float32) if g_ent is not None else None
        inv_t = 1.0 / temperature if temperature > 0 and temperature != 1.0 else 1.0
        for a in range(0, rows, step):
            b = min(rows, a + step)
            logp_all = _scaled(x2[a:b, :valid], temperature) - lse[a:b, None]
            p = logp_all.exp()
            coef = torch.zeros_like(p[:, :1])
            if glp is not None:
                coef = coef + glp[a:b, None]
            if gent is not None:
                g = -p * (coef + gent[a:b, None] * (logp_all + entropy[a:b, None]))
            else:
                g = -p * coef
            if glp is not None:
                g.scatter_add_(1, local_t[a:b, None], (glp[a:b] * in_range[a:b])[:, None])
            if inv_t != 1.0:
                g.mul_(inv_t)
            grad[a:b, :valid] = g.to(grad.dtype)
        return grad.reshape(logits.shape), None, None, None, None, None
