"""Samples -> RolloutBatch -> steps, DP shards, micro-batches and their padded or packed tensors."""

from __future__ import annotations

import pytest
import torch

from miles.sample import Sample
from miles.spec.tables import TrainConfig
from miles.train.batch import (
    RolloutBatch,
    collate,
    pack,
    plan_micro_batches,
    rank_slices,
    shard,
    shard_balanced,
    step_indices,
)


def _sample(prompt: list[int], response: list[int], reward: float = 0.0, group: int = 0, lps: bool = True) -> Sample:
    return Sample(
        group_index=group,
        prompt_index=group,
        prompt="",
        prompt_text="",
        prompt_ids=prompt,
        response_ids=response,
        response_logprobs=[-0.5] * len(response) if lps else [],
        reward=reward,
    )


def test_from_samples() -> None:
    b = RolloutBatch.from_samples([_sample([5, 6, 7], [8, 9], 1.0, 0), _sample([1], [2, 3, 4], 0.0, 1)])
    assert [t.tolist() for t in b.tokens] == [[5, 6, 7, 8, 9], [1, 2, 3, 4]]
    assert b.prompt_lens == [3, 1] and b.response_lens == [2, 3]
    assert b.rewards.tolist() == [1.0, 0.0] and b.group_index == [0, 1]
    assert [m.tolist() for m in b.loss_masks] == [[1.0, 1.0], [1.0, 1.0, 1.0]]
    assert b.rollout_logprobs is not None and b.rollout_logprobs[1].tolist() == [-0.5] * 3
    assert RolloutBatch.from_samples([_sample([1], [2], lps=False)]).rollout_logprobs is None
    with pytest.raises(ValueError, match="no prompt tokens"):
        RolloutBatch.from_samples([_sample([], [2])])


def test_collate_pads_right_and_aligns_responses_with_their_logits() -> None:
    b = RolloutBatch.from_samples([_sample([5, 6, 7], [8, 9]), _sample([1], [2, 3, 4])])
    b.advantages = [torch.tensor([1.0, 1.0]), torch.tensor([-1.0, -1.0, -1.0])]
    mb = collate(b, [0, 1], pad_id=0)
    assert mb.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # response token j of a sample with prompt length p is predicted at position p - 1 + j
    assert mb.logit_pos.tolist() == [[2, 3, 0], [0, 1, 2]]
    assert mb.targets.tolist() == [[8, 9, 0], [2, 3, 4]]
    assert mb.mask.tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    assert mb.advantages is not None and mb.advantages.tolist() == [[1.0, 1.0, 0.0], [-1.0, -1.0, -1.0]]
    assert mb.old_logprobs is None
    assert mb.first_logit_pos == 0 and collate(b, [0]).first_logit_pos == 2
    assert mb.rollout_logprobs is not None and mb.rollout_logprobs.tolist() == [[-0.5, -0.5, 0.0], [-0.5] * 3]
    dummy = collate(b, [], pad_id=0)
    assert dummy.input_ids.shape == (1, 1) and dummy.mask.sum() == 0


def test_pack_puts_sequences_back_to_back_and_aligns_responses_with_their_logits() -> None:
    b = RolloutBatch.from_samples([_sample([5, 6, 7], [8, 9]), _sample([1], [2, 3, 4])])
    b.advantages = [torch.tensor([1.0, 1.0]), torch.tensor([-1.0, -1.0, -1.0])]
    mb = pack(b, [0, 1], pad_id=0, multiple=4)
    assert mb.packed and not collate(b, [0, 1]).packed
    # 5 + 4 tokens padded to 12 (a multiple of 4): the padding is a third document
    assert mb.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4, 0, 0, 0]]
    assert mb.seq_lens == [5, 4, 3]
    assert mb.position_ids is not None and mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]]
    assert mb.attention_mask.tolist() == [[1] * 9 + [0] * 3]
    # sample 1 starts at offset 5: its response token j is predicted at 5 + p - 1 + j
    assert mb.logit_pos.tolist() == [[2, 3, 0], [5, 6, 7]]
    # everything the loss reads is the padded layout's, so the loss cannot tell the layouts apart
    padded = collate(b, [0, 1])
    for name in ("targets", "mask", "advantages", "rollout_logprobs"):
        assert torch.equal(getattr(mb, name), getattr(padded, name)), name
    assert mb.first_logit_pos == 2 and pack(b, [1, 0]).first_logit_pos == 0
    assert pack(b, [0, 1]).seq_lens == [5, 4]  # no padding document when the row needs none
    dummy = pack(b, [], pad_id=0)
    assert dummy.input_ids.shape == (1, 1) and dummy.mask.sum() == 0 and dummy.seq_lens == [1]


def test_dynamic_packed_micro_batches_budget_the_sum_of_lengths() -> None:
    lengths = [4, 4, 9, 2, 3, 3, 3, 3]
    # packed, a micro-batch costs what it holds: rank 0 4+4 (8 <= 10), 9 alone; rank 1 2+3+3 (8), 3+3
    plans = plan_micro_batches([[0, 1, 2], [3, 4, 5, 6, 7]], lengths, micro_batch_size=1, max_tokens=10, packed=True)
    assert plans == [[[0, 1], [2]], [[3, 4, 5], [6, 7]]]
    # padded, rank 1's 2,3,3,3 would cost 4 x 3 = 12 > 10 after three; packed it holds 2+3+3 and then 3+3
    assert plan_micro_batches([[3, 4, 5, 6, 7]], lengths, micro_batch_size=1, max_tokens=10) == [[[3, 4, 5], [6, 7]]]
    assert plan_micro_batches([[0, 1, 3]], [4, 4, 0, 2], micro_batch_size=1, max_tokens=10, packed=True) == [
        [[0, 1, 3]]
    ]
    assert plan_micro_batches([[0, 1, 3]], [4, 4, 0, 2], micro_batch_size=1, max_tokens=10) == [[[0, 1], [3]]]


def test_steps_and_shards() -> None:
    assert step_indices(6, 3, 2) == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="global_batch_size"):
        step_indices(7, 3, 2)
    assert shard([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert shard([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert shard([0], 2) == [[0], []]


def test_fixed_micro_batches() -> None:
    plans = plan_micro_batches([[0, 1, 2], [3, 4, 5]], [5] * 6, micro_batch_size=2)
    assert plans == [[[0, 1], [2]], [[3, 4], [5]]]


def test_dynamic_micro_batches_budget_padded_tokens_and_equalise_counts() -> None:
    lengths = [4, 4, 9, 2, 3, 3, 3, 3]
    # rank 0: 4,4 fit (2*4=8 <= 10); adding 9 -> 3*9 > 10; 9 alone. rank 1: 2,3,3 (3*3=9), then 3 -> 4*3 > 10
    plans = plan_micro_batches([[0, 1, 2], [3, 4, 5, 6]], lengths, micro_batch_size=1, max_tokens=10)
    assert plans[0] == [[0, 1], [2]]
    assert plans[1] == [[3, 4, 5], [6]]
    # rank 0 needs two micro-batches ([9] alone, then 4+4), rank 1 one (1+1+1): rank 1's largest is halved
    plans = plan_micro_batches([[2, 0, 1], [3, 4, 5]], [4, 4, 9, 1, 1, 1], micro_batch_size=1, max_tokens=9)
    assert plans == [[[2], [0, 1]], [[3, 4], [5]]]


def test_a_rank_with_fewer_samples_than_micro_batches_gets_empty_ones() -> None:
    plans = plan_micro_batches([[0, 1, 2], [3]], [1] * 4, micro_batch_size=1)
    assert plans == [[[0], [1], [2]], [[3], [], []]]


def test_plans_are_deterministic() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 20, (32,), generator=g).tolist()
    per_rank = shard(list(range(32)), 4)
    a = plan_micro_batches(per_rank, lengths, micro_batch_size=1, max_tokens=40)
    assert a == plan_micro_batches(per_rank, lengths, micro_batch_size=1, max_tokens=40)
    for p in a:
        assert len(p) == len(a[0])
        for mb in p:
            assert len(mb) <= 1 or max(lengths[i] for i in mb) * len(mb) <= 40


def test_balance_data_gives_ranks_equal_counts_and_near_equal_tokens() -> None:
    # Long responses first: contiguous slices put them all on rank 0.
    lengths = [40, 38, 36, 34, 4, 3, 2, 1]
    batch = RolloutBatch.from_samples([_sample([1], list(range(n - 1))) for n in lengths])
    assert [batch.seq_len(i) for i in range(8)] == lengths
    idx = list(range(8))
    contiguous = rank_slices(batch, idx, 2, TrainConfig())
    balanced = rank_slices(batch, idx, 2, TrainConfig(balance_data=True))
    assert contiguous == shard(idx, 2)

    def tokens(slices: list[list[int]]) -> list[int]:
        return [sum(lengths[i] for i in s) for s in slices]

    assert tokens(contiguous) == [148, 10]
    assert [len(s) for s in balanced] == [4, 4]
    assert sorted(i for s in balanced for i in s) == idx
    assert max(tokens(balanced)) - min(tokens(balanced)) <= 4
    assert all(s == sorted(s) for s in balanced)  # each rank keeps rollout order


def test_balanced_shards_keep_uneven_counts_of_contiguous_shards() -> None:
    lengths = [5, 9, 1, 7, 3]
    parts = shard_balanced([0, 1, 2, 3, 4], 2, lengths)
    assert [len(p) for p in parts] == [len(p) for p in shard([0, 1, 2, 3, 4], 2)] == [3, 2]
    assert [sum(lengths[i] for i in p) for p in parts] in ([13, 12], [12, 13])
