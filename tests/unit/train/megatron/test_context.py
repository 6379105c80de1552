"""The context-parallel sequence layout: which chunks a rank holds, and putting gathered chunks back in order.

The collectives themselves run in ``test_megatron_actor.py`` (CP=2 over gloo,
a GRPO step equal to the FSDP backend's).
"""

from __future__ import annotations

import pytest
import torch

from miles.train.megatron.context import ContextLayout


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_split_then_full_order_restores_the_sequence(size: int) -> None:
    length = 4 * size  # 2 * size chunks of 2 tokens
    x = torch.arange(2 * length * 3).reshape(2, length, 3)
    layouts = [ContextLayout(size, r) for r in range(size)]
    parts = [layout.split(x, dim=1) for layout in layouts]
    if size == 1:
        assert parts[0] is x
        return
    assert all(p.shape[1] == x.shape[1] // size for p in parts)
    assert torch.equal(layouts[0]._full_order(torch.cat(parts, dim=1), dim=1), x)


def test_chunks_balance_causal_work() -> None:
    # Rank r holds chunk r and its mirror: every rank gets the same number of (query, key) pairs under a causal mask.
    assert [ContextLayout(4, r).chunks for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert {sum(c + 1 for c in ContextLayout(4, r).chunks) for r in range(4)} == {9}


def test_padded_length_divides_into_chunks_and_sequence_parallel_ranks() -> None:
    assert ContextLayout(1, 0).padded_length(13) == 13
    assert ContextLayout(1, 0).padded_length(13, multiple=2) == 14
    assert ContextLayout(2, 0).padded_length(13) == 16
    assert ContextLayout(2, 0).padded_length(13, multiple=2) == 16
    assert ContextLayout(2, 0).padded_length(17, multiple=2) == 24


def test_split_refuses_a_length_the_chunks_do_not_divide() -> None:
    with pytest.raises(ValueError, match="does not split into 4"):
        ContextLayout(2, 0).split(torch.zeros(1, 6), dim=1)
