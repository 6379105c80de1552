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
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def vocab_parallel_logprobs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    temperature: float = 1.0,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, entropy)`` ``[...]`` float32 from this rank's logits slice ``[..., V_local]``.

    ``vocab_start`` is the global id of this rank's first column; columns at
    or beyond ``vocab_size`` (the padding that makes the vocabulary divide by
    TP) are excluded from the distribution. ``group=None`` with one rank (or
    no process group) means no tensor parallelism.
    """
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    tp = dist.get_world_size(group) if dist.is_initialized() else 1

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
