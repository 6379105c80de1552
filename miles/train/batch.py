"""From a rollout's samples to the padded tensors a forward pass eats.

The rollout lives on every trainer rank as a :class:`RolloutBatch` (ragged,
per-sample tensors in rollout order). Training splits it deterministically:

* step ``s`` (of ``num_steps_per_rollout``) trains samples
  ``[s * global_batch_size, (s + 1) * global_batch_size)``;
* DP rank ``r`` of ``dp`` takes the ``r``-th contiguous slice of
  ``global_batch_size / dp`` samples of that step, or with ``balance_data``
  the same number of samples chosen so that every rank has about as many tokens;
* its slice is cut into micro-batches of ``micro_batch_size`` samples, or with
  ``use_dynamic_batch_size`` greedily in order while the micro-batch's cost
  stays within ``max_tokens_per_gpu``: the sum of its lengths when packed,
  ``count * longest`` when padded (what the forward pass actually computes).

FSDP (and Megatron's DP) run collectives in every forward, so every DP rank
must run the same number of micro-batches: :func:`plan_micro_batches` plans all
ranks together and splits the largest micro-batches of the ranks that have
fewer until the counts agree (or leaves empty ones, which the actor runs as a
dummy forward, when a rank has fewer samples than others have micro-batches).

A micro-batch has one of two layouts (``[train] qkv_format``):

* padded (``bshd``, :func:`collate`): ``input_ids [B, T]`` right-padded with an
  attention mask, the logits of sample ``i``'s response token ``j`` at row
  ``i``, position ``prompt_len_i + j - 1``;
* packed (``thd``, :func:`pack`): the ``B`` sequences back to back in one row
  ``input_ids [1, sum]`` with ``position_ids`` restarting at 0 for each and
  ``seq_lens`` marking where each ends (attention is causal within a sequence
  and never across, see the backends); the logits of sample ``i``'s response
  token ``j`` sit at ``offset_i + prompt_len_i + j - 1`` of the row.

Either way the per-token tensors the loss reads are response-aligned ``[B, R]``
(``R`` = longest response), and ``logit_pos [B, R]`` says where in the model's
output each one's logits are, so the loss code never sees the layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from miles.algo.loss import LossInputs, policy_loss, token_weights
from miles.sample import Sample

if TYPE_CHECKING:
    from miles.algo.loss import Aggregation, LossConfig
    from miles.spec.tables import TrainConfig


@dataclass
class RolloutBatch:
    """One rollout's samples as ragged tensors, identical on every trainer rank."""

    tokens: list[torch.Tensor]
    """``N`` int64 tensors ``[P_i + R_i]``: prompt ids then response ids."""
    prompt_lens: list[int]
    response_lens: list[int]
    loss_masks: list[torch.Tensor]
    """``N`` float32 ``[R_i]``: 1 on trained response tokens."""
    rewards: torch.Tensor
    """``[N]`` float32."""
    group_index: list[int]
    rollout_logprobs: list[torch.Tensor] | None = None
    """The engine's log-probs ``[R_i]``; ``None`` when the engine returned none."""
    old_logprobs: list[torch.Tensor] | None = None
    ref_logprobs: list[torch.Tensor] | None = None
    advantages: list[torch.Tensor] | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> RolloutBatch:
        """Tensors from samples: each sample's loss mask (all ones for single-turn), so a multi-turn sample's tool
        outputs and template glue are in the sequence the forward pass sees but train nothing."""
        tokens, plens, rlens, masks, lps = [], [], [], [], []
        have_lp = all(len(s.response_logprobs) == len(s.response_ids) for s in samples) and bool(samples)
        for s in samples:
            if not s.prompt_ids:
                raise ValueError(f"sample of prompt {s.prompt_index} has no prompt tokens")
            tokens.append(torch.tensor(list(s.prompt_ids) + list(s.response_ids), dtype=torch.long))
            plens.append(len(s.prompt_ids))
            rlens.append(len(s.response_ids))
            masks.append(torch.tensor(s.trained_mask(), dtype=torch.float32))
            if have_lp:
                lps.append(torch.tensor(s.response_logprobs, dtype=torch.float32))
        return cls(
            tokens=tokens,
            prompt_lens=plens,
            response_lens=rlens,
            loss_masks=masks,
            rewards=torch.tensor([s.reward for s in samples], dtype=torch.float32),
            group_index=[s.group_index for s in samples],
            rollout_logprobs=lps if have_lp else None,
        )

    def seq_len(self, i: int) -> int:
        return self.prompt_lens[i] + self.response_lens[i]


def step_indices(n_samples: int, global_batch_size: int, num_steps: int) -> list[list[int]]:
    """Sample indices of each optimizer step of a rollout (in order; exact division required)."""
    if global_batch_size * num_steps != n_samples:
        raise ValueError(
            f"rollout has {n_samples} samples but global_batch_size {global_batch_size} x num_steps_per_rollout "
            f"{num_steps} = {global_batch_size * num_steps}"
        )
    return [list(range(s * global_batch_size, (s + 1) * global_batch_size)) for s in range(num_steps)]


def shard(indices: Sequence[int], dp_size: int) -> list[list[int]]:
    """Contiguous, balanced slices of ``indices`` for each DP rank (the first ranks get one more when uneven)."""
    n = len(indices)
    base, extra = divmod(n, dp_size)
    out, start = [], 0
    for r in range(dp_size):
        size = base + (1 if r < extra else 0)
        out.append(list(indices[start : start + size]))
        start += size
    return out


def shard_balanced(indices: Sequence[int], dp_size: int, lengths: Sequence[int]) -> list[list[int]]:
    """Slices of ``indices`` with the sample counts of :func:`shard` but about equal tokens per DP rank.

    Longest sample first, each to the rank with the fewest tokens that still has room (greedy
    number partitioning); each rank keeps its samples in rollout order. Which rank trains a sample
    does not change the loss (every micro-batch's share is normalised over the whole step, see
    :func:`micro_batch_loss`), only how long the slowest rank takes.
    """
    capacity = [len(s) for s in shard(indices, dp_size)]
    tokens = [0] * dp_size
    out: list[list[int]] = [[] for _ in range(dp_size)]
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        r = min((r for r in range(dp_size) if len(out[r]) < capacity[r]), key=lambda r: (tokens[r], r))
        out[r].append(i)
        tokens[r] += lengths[i]
    return [sorted(s) for s in out]


def rank_slices(batch: RolloutBatch, indices: Sequence[int], dp_size: int, train: TrainConfig) -> list[list[int]]:
    """Each DP rank's samples of ``indices``: by tokens with ``[train] balance_data``, else contiguous slices."""
    if train.balance_data:
        return shard_balanced(indices, dp_size, [batch.seq_len(i) for i in range(len(batch))])
    return shard(indices, dp_size)


def _split_rank(
    indices: list[int], lengths: Sequence[int], micro_batch_size: int, max_tokens: int | None, packed: bool
) -> list[list[int]]:
    if max_tokens is None:
        return [indices[i : i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]
    mbs: list[list[int]] = []
    cur: list[int] = []
    longest = total = 0
    for i in indices:
        n = lengths[i]
        cost = total + n if packed else max(longest, n) * (len(cur) + 1)
        if cur and cost > max_tokens:
            mbs.append(cur)
            cur, longest, total = [], 0, 0
        cur.append(i)
        longest, total = max(longest, n), total + n
    if cur:
        mbs.append(cur)
    return mbs


def plan_micro_batches(
    per_rank: Sequence[Sequence[int]],
    lengths: Sequence[int],
    *,
    micro_batch_size: int,
    max_tokens: int | None = None,
    packed: bool = False,
) -> list[list[list[int]]]:
    """Micro-batches for every DP rank, with the same count on every rank.

    ``per_rank[r]`` are rank ``r``'s sample indices, ``lengths[i]`` sample
    ``i``'s sequence length. ``max_tokens`` switches to dynamic batching, which
    counts a micro-batch's tokens as packed (``packed``) or padded.
    """
    plans = [_split_rank(list(idx), lengths, micro_batch_size, max_tokens, packed) for idx in per_rank]
    target = max((len(p) for p in plans), default=0)
    for p in plans:
        while len(p) < target:
            big = max(range(len(p)), key=lambda k: (len(p[k]), -k)) if p else -1
            if big < 0 or len(p[big]) <= 1:
                p.append([])
                continue
            mb = p[big]
            half = (len(mb) + 1) // 2
            p[big : big + 1] = [mb[:half], mb[half:]]
    return plans


@dataclass
class MicroBatch:
    """Padded tensors of a few samples (see the module docstring for the layout)."""

    indices: list[int]
    input_ids: torch.Tensor
    """``[B, T]`` int64, right-padded with ``pad_id``."""
    attention_mask: torch.Tensor
    """``[B, T]`` int64."""
    logit_pos: torch.Tensor
    """``[B, R]`` int64: sequence position whose logits predict response token ``j`` (0 on padding)."""
    targets: torch.Tensor
    """``[B, R]`` int64: the response tokens (0 on padding)."""
    mask: torch.Tensor
    """``[B, R]`` float32: loss mask, 0 on padding."""
    advantages: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    rollout_logprobs: torch.Tensor | None = None
    first_logit_pos: int = 0
    """Smallest ``logit_pos`` of a trained token: logits before it are never needed (``logits_to_keep = T - first``)."""
    seq_lens: list[int] | None = None
    """Packed layout only: the lengths of the documents in the row, in order, ending with a padding document when
    the row was padded to a multiple; ``None`` for the padded layout."""
    position_ids: torch.Tensor | None = None
    """Packed layout only: ``[1, T]`` int64, each document's positions from 0."""

    @property
    def packed(self) -> bool:
        return self.seq_lens is not None

    def to(self, device: torch.device) -> MicroBatch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return MicroBatch(
            indices=self.indices,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            logit_pos=self.logit_pos.to(device),
            targets=self.targets.to(device),
            mask=self.mask.to(device),
            advantages=mv(self.advantages),
            old_logprobs=mv(self.old_logprobs),
            ref_logprobs=mv(self.ref_logprobs),
            rollout_logprobs=mv(self.rollout_logprobs),
            first_logit_pos=self.first_logit_pos,
            seq_lens=self.seq_lens,
            position_ids=mv(self.position_ids),
        )


def _pad_ragged(rows: Sequence[torch.Tensor], width: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=dtype)
    for k, r in enumerate(rows):
        out[k, : r.numel()] = r.to(dtype)
    return out


def _response_fields(batch: RolloutBatch, indices: Sequence[int], width: int) -> dict[str, Any]:
    """The per-response rows both layouts share (targets, mask, advantages, log-probs), right-padded to ``width``."""

    def opt(rows: list[torch.Tensor] | None) -> torch.Tensor | None:
        return None if rows is None else _pad_ragged([rows[i] for i in indices], width, torch.float32)

    return {
        "targets": _pad_ragged([batch.tokens[i][batch.prompt_lens[i] :] for i in indices], width, torch.long),
        "mask": _pad_ragged([batch.loss_masks[i] for i in indices], width, torch.float32),
        "advantages": opt(batch.advantages),
        "old_logprobs": opt(batch.old_logprobs),
        "ref_logprobs": opt(batch.ref_logprobs),
        "rollout_logprobs": opt(batch.rollout_logprobs),
    }


def collate(batch: RolloutBatch, indices: Sequence[int], pad_id: int = 0) -> MicroBatch:
    """Pad samples ``indices`` of ``batch`` into a :class:`MicroBatch`; an empty list gives a one-token dummy."""
    if not indices:
        one = torch.full((1, 1), pad_id, dtype=torch.long)
        zero = torch.zeros(1, 1)
        return MicroBatch(
            [],
            one,
            torch.ones(1, 1, dtype=torch.long),
            torch.zeros(1, 1, dtype=torch.long),
            torch.zeros(1, 1, dtype=torch.long),
            zero,
            zero.clone(),
        )
    T = max(batch.seq_len(i) for i in indices)
    R = max(max(batch.response_lens[i] for i in indices), 1)
    B = len(indices)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    logit_pos = torch.zeros(B, R, dtype=torch.long)
    for k, i in enumerate(indices):
        n, p, r = batch.seq_len(i), batch.prompt_lens[i], batch.response_lens[i]
        input_ids[k, :n] = batch.tokens[i]
        attn[k, :n] = 1
        logit_pos[k, :r] = torch.arange(p - 1, p - 1 + r)
    return MicroBatch(
        indices=list(indices),
        input_ids=input_ids,
        attention_mask=attn,
        logit_pos=logit_pos,
        **_response_fields(batch, indices, R),
        first_logit_pos=min((batch.prompt_lens[i] - 1 for i in indices if batch.response_lens[i] > 0), default=T - 1),
    )


def pack(batch: RolloutBatch, indices: Sequence[int], pad_id: int = 0, multiple: int = 1) -> MicroBatch:
    """Samples ``indices`` of ``batch`` back to back in one row (the packed layout of the module docstring).

    The row is right-padded to a multiple of ``multiple`` (sequence parallelism splits it over TP); the padding is
    a document of its own, so it attends only to itself and nothing attends to it. An empty list gives a one-token
    dummy, as :func:`collate` does.
    """
    if not indices:
        seq = [1]
        ids = torch.full((1, 1), pad_id, dtype=torch.long)
        zero = torch.zeros(1, 1)
        return MicroBatch(
            [],
            ids,
            torch.ones(1, 1, dtype=torch.long),
            torch.zeros(1, 1, dtype=torch.long),
            torch.zeros(1, 1, dtype=torch.long),
            zero,
            zero.clone(),
            seq_lens=seq,
            position_ids=torch.zeros(1, 1, dtype=torch.long),
        )
    lens = [batch.seq_len(i) for i in indices]
    used = sum(lens)
    total = -(-used // multiple) * multiple
    seq_lens = lens + ([total - used] if total > used else [])
    ids = torch.full((1, total), pad_id, dtype=torch.long)
    ids[0, :used] = torch.cat([batch.tokens[i] for i in indices])
    attn = torch.zeros(1, total, dtype=torch.long)
    attn[0, :used] = 1
    position_ids = torch.cat([torch.arange(n) for n in seq_lens]).unsqueeze(0)
    R = max(max(batch.response_lens[i] for i in indices), 1)
    logit_pos = torch.zeros(len(indices), R, dtype=torch.long)
    offset, first = 0, None
    for k, i in enumerate(indices):
        p, r = batch.prompt_lens[i], batch.response_lens[i]
        logit_pos[k, :r] = torch.arange(offset + p - 1, offset + p - 1 + r)
        if r > 0 and first is None:
            first = offset + p - 1
        offset += lens[k]
    return MicroBatch(
        indices=list(indices),
        input_ids=ids,
        attention_mask=attn,
        logit_pos=logit_pos,
        **_response_fields(batch, indices, R),
        first_logit_pos=total - 1 if first is None else first,
        seq_lens=seq_lens,
        position_ids=position_ids,
    )


def check_trainable(batch: RolloutBatch, train: TrainConfig, loss: LossConfig) -> None:
    """What ``Actor.train`` needs in the batch, checked the same way by every backend."""
    if batch.advantages is None:
        raise ValueError("batch.advantages must be set before train()")
    if batch.old_logprobs is None and (train.num_steps_per_rollout or 1) > 1:
        raise ValueError("old_logprobs are required with more than one optimizer step per rollout")
    if loss.use_kl_loss and batch.ref_logprobs is None:
        raise ValueError("use_kl_loss needs batch.ref_logprobs")
    if loss.use_tis and batch.rollout_logprobs is None:
        raise ValueError("use_tis needs the engine's log-probs in every sample")


def assemble(parts: Iterable[Iterable[tuple[int, Any]]], n: int) -> list[torch.Tensor]:
    """Per-sample tensors gathered from every rank as ``(index, tensor)`` pairs, back in batch order."""
    out: list[torch.Tensor | None] = [None] * n
    for part in parts:
        for i, t in part:
            out[i] = t
    missing = [i for i, t in enumerate(out) if t is None]
    if missing:
        raise RuntimeError(f"no rank returned log-probs for samples {missing[:5]}")
    return [t for t in out if t is not None]


def micro_batch_loss(
    loss: LossConfig,
    aggregation: Aggregation,
    mb: MicroBatch,
    logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    *,
    global_tokens: float,
    global_samples: int,
    max_response_len: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's share of the global-batch loss, the same for every backend.

    The weights divide by the whole optimizer step's token or sample count, so the
    micro-batches of all DP ranks add up to the loss of the whole batch.
    """

    w = token_weights(
        mb.mask,
        aggregation,
        global_tokens=global_tokens,
        global_samples=global_samples,
        max_response_len=max_response_len,
    )
    assert mb.advantages is not None
    return policy_loss(
        loss,
        LossInputs(
            logprobs=logprobs,
            advantages=mb.advantages,
            mask=mb.mask,
            weights=w,
            old_logprobs=mb.old_logprobs,
            entropy=entropy,
            ref_logprobs=mb.ref_logprobs,
            rollout_logprobs=mb.rollout_logprobs,
        ),
    )
