"""Multi-turn token accounting and loss masks, on hand-built conversations with known ids."""

from __future__ import annotations

import pytest
import torch

from miles.rollout.client import RolloutError
from miles.rollout.conversation import Conversation
from miles.rollout.generate import check_sample
from miles.sample import Sample
from miles.train.batch import RolloutBatch, collate

PROMPT = [1, 4, 5, 6]
TURN1, GLUE, TURN2 = [21, 9], [23, 7], [7, 2]


def _two_turns(max_len: int = 16, per_turn: int | None = None) -> Conversation:
    conv = Conversation(list(PROMPT), max_len, per_turn)
    conv.add_model_turn(TURN1, [-0.5, -0.25])
    conv.add_glue(GLUE)
    conv.add_model_turn(TURN2, [-1.0, -2.0])
    return conv


def test_ids_masks_and_logprobs_of_a_tool_conversation() -> None:
    conv = _two_turns()
    assert conv.ids == TURN1 + GLUE + TURN2
    assert conv.mask == [1, 1, 0, 0, 1, 1]
    assert conv.logprobs == [-0.5, -0.25, 0.0, 0.0, -1.0, -2.0]
    assert conv.input_ids() == PROMPT + TURN1 + GLUE + TURN2  # the next turn reads exactly these ids
    assert conv.turns == 2 and conv.room == 16 - 6


def test_limits_per_turn_and_in_total() -> None:
    conv = Conversation(list(PROMPT), max_response_len=7, max_tokens_per_turn=3)
    assert conv.turn_limit() == 3
    conv.add_model_turn([5, 6, 7], [0.0] * 3)
    with pytest.raises(ValueError, match="exceeds the turn limit"):
        conv.add_model_turn([5, 6, 7, 8], [0.0] * 4)
    assert not conv.fits([1, 2, 3, 4])  # glue that would leave no token for a model turn
    conv.add_glue([1, 2])
    assert conv.room == 2 and conv.turn_limit() == 2  # the total binds before the per-turn limit


def test_the_trainer_sees_every_token_but_trains_only_the_models() -> None:
    conv = _two_turns()
    s = Sample(0, 0, "p", "p", list(PROMPT), response_ids=conv.ids, response_logprobs=conv.logprobs)
    s.loss_mask = conv.mask
    single = Sample(0, 1, "p", "p", list(PROMPT), response_ids=[3, 3], response_logprobs=[-0.1, -0.1])
    batch = RolloutBatch.from_samples([s, single])
    assert batch.tokens[0].tolist() == PROMPT + conv.ids
    assert batch.loss_masks[0].tolist() == [1, 1, 0, 0, 1, 1]
    assert batch.loss_masks[1].tolist() == [1, 1]  # single-turn: loss_mask None is all ones
    mb = collate(batch, [0, 1])
    assert mb.mask[0].tolist() == [1, 1, 0, 0, 1, 1]
    assert mb.mask[1].tolist() == [1, 1, 0, 0, 0, 0]
    assert mb.targets[0].tolist() == conv.ids
    # Response token j of sample 0 is predicted by the logits at prompt_len + j - 1.
    assert mb.logit_pos[0].tolist() == list(range(len(PROMPT) - 1, len(PROMPT) + 5))
    assert torch.equal(mb.rollout_logprobs[0], torch.tensor(conv.logprobs))  # type: ignore[index]


def test_a_sample_that_breaks_the_contract_is_refused() -> None:
    s = Sample(0, 0, "p", "p", list(PROMPT), response_ids=[3, 4], response_logprobs=[-0.1])
    with pytest.raises(RolloutError, match="1 response_logprobs for 2 response_ids"):
        check_sample(s, "gen")
    s.response_logprobs = [-0.1, -0.2]
    s.loss_mask = [1]
    with pytest.raises(RolloutError, match="loss_mask of 1 entries"):
        check_sample(s, "gen")
    s.loss_mask = [1, 2]
    with pytest.raises(RolloutError, match="one 0 or 1"):
        check_sample(s, "gen")
