"""Dynamic sampling and over-sampling against a real embedded engine over HTTP, with hand-checkable counts."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from miles.data.dataset import Prompt
from miles.engine.core import Engine
from miles.reward.filters import DynamicFilterOutput, check_reward_nonzero_std
from miles.reward.model import RewardModel
from miles.rollout.client import RolloutClient
from miles.rollout.oversample import DataExhausted, FilledRollout, fill
from miles.sample import Sample
from miles.spec.tables import RolloutConfig
from tests.unit.engine.server_harness import ServerThread

PROMPTS = [Prompt(i, f"data:{i}", f"{i}=", f"{i}=", [4 + i % 6, 5, 13]) for i in range(12)]


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path) -> Iterator[ServerThread]:
    torch.set_num_threads(1)
    s = ServerThread(Engine(tiny_model_dir, seed=0, max_batch_size=8), batch_wait_ms=0)
    yield s
    s.stop()


class Cursor:
    """The dataset's ``sample``: the next prompts in order, counting what was drawn."""

    def __init__(self) -> None:
        self.offset = 0

    def sample(self, n: int) -> list[Prompt]:
        out = [PROMPTS[(self.offset + i) % len(PROMPTS)] for i in range(n)]
        self.offset += n
        return out


def keep_odd_prompts(args: Any, samples: list[Sample], **kwargs: Any) -> DynamicFilterOutput:
    odd = samples[0].prompt_index % 2 == 1
    return DynamicFilterOutput(keep=odd, reason=None if odd else "even")


def run(srv: ServerThread, cfg: RolloutConfig, keep: Any, chunk_size: int) -> tuple[FilledRollout, Cursor]:
    cursor = Cursor()
    reward = RewardModel(per_sample=lambda s: float(s.prompt_index))

    async def go() -> FilledRollout:
        async with RolloutClient([srv.url], chunk_size=chunk_size) as client:
            return await fill(client, cursor.sample, reward, keep, cfg, rollout_id=3, dataset_size=len(PROMPTS))

    try:
        return asyncio.run(go()), cursor
    finally:
        reward.close()


def test_a_filter_drops_known_groups_and_rounds_refill_the_batch(srv: ServerThread) -> None:
    cfg = RolloutConfig(
        rollout_batch_size=3, n_samples_per_prompt=2, over_sampling_batch_size=4, rollout_max_response_len=4
    )
    filled, cursor = run(srv, cfg, keep_odd_prompts, chunk_size=32)
    # round 1 draws prompts 0-3 (keeps 1, 3); round 2 draws 4-7, keeps 5 and the batch is full: 6, 7 are surplus
    assert [s.prompt_index for s in filled.samples] == [1, 1, 3, 3, 5, 5]
    assert [s.group_index for s in filled.samples] == [0, 0, 1, 1, 2, 2]
    c = filled.counts
    assert (c.prompts_used, c.groups_sampled, c.groups_kept, c.groups_dropped, c.groups_surplus) == (8, 8, 3, 3, 2)
    assert c.drop_reasons == {"even": 3} and cursor.offset == 8
    assert filled.reward.count == 6 and filled.reward.mean == pytest.approx(3.0)
    assert all(s.reward == s.prompt_index and s.response_ids for s in filled.samples)

    # seeds follow positions over all rounds: prompt 5 was sample positions 10 and 11 of the rollout
    again = [Sample(0, 5, "", "", list(PROMPTS[5].prompt_ids)) for _ in range(2)]

    async def direct() -> None:
        async with RolloutClient([srv.url]) as client:
            await client.generate(again, cfg, rollout_id=3, first_index=10)

    asyncio.run(direct())
    assert [s.response_ids for s in again] == [s.response_ids for s in filled.samples[4:]]


def test_over_sampling_aborts_the_surplus_on_the_engine(srv: ServerThread) -> None:
    cfg = RolloutConfig(
        rollout_batch_size=2, n_samples_per_prompt=2, over_sampling_batch_size=10, rollout_max_response_len=64
    )
    filled, cursor = run(srv, cfg, None, chunk_size=2)  # one group per request: ten requests, served one at a time
    assert [s.prompt_index for s in filled.samples] == [0, 0, 1, 1]
    c = filled.counts
    assert (c.prompts_used, c.groups_kept, c.groups_dropped, c.groups_surplus) == (10, 2, 0, 8)
    assert cursor.offset == 10
    # the engine had most surplus requests still queued or running when the batch was full: it aborted them
    assert filled.samples_aborted >= 2
    assert not srv.server._queue and not srv.server._running


def test_a_filter_that_drops_everything_stops_after_one_pass(srv: ServerThread) -> None:
    cfg = RolloutConfig(
        rollout_batch_size=2, n_samples_per_prompt=2, over_sampling_batch_size=5, rollout_max_response_len=2
    )
    with pytest.raises(DataExhausted, match="only 0 of rollout_batch_size = 2 groups passed"):
        run(srv, cfg, lambda args, samples: False, chunk_size=32)


def test_the_engine_aborts_a_running_row_by_position(tiny_model_dir: Path) -> None:
    from miles.engine.core import GenerationRequest
    from miles.engine.sampling import SamplingParams

    engine = Engine(tiny_model_dir, seed=0, max_batch_size=4)
    engine.cancelled = {1}
    params = SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)
    outs = engine.generate([GenerationRequest([4, 5, 13], params), GenerationRequest([6, 7, 13], params)])
    assert len(outs[0].output_ids) == 5 and outs[1].output_ids == []
    assert outs[1].finish_reason["type"] == "abort"


def test_the_zero_variance_filter() -> None:
    def group(*rewards: float) -> list[Sample]:
        return [Sample(0, 0, "", "", [1], reward=r) for r in rewards]

    assert check_reward_nonzero_std(None, group(0.0, 1.0, 1.0)).keep
    out = check_reward_nonzero_std(None, group(1.0, 1.0))
    assert not out.keep and out.reason == "zero_std_1.0"
    assert not check_reward_nonzero_std(None, group(0.0, 0.0, 0.0)).keep
