"""Partial rollouts against a real embedded engine over HTTP: the surplus kept, continued next rollout, masked.

Every figure here can be checked by hand: rollouts of one kept group of two samples,
rounds of two prompts (one group per request), so the second prompt of each round
is the surplus the partial rollout carries over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from miles.data.dataset import Prompt
from miles.engine.core import Engine
from miles.errors import UserError
from miles.reward.model import RewardModel
from miles.rollout.client import RolloutClient
from miles.rollout.oversample import FilledRollout, fill
from miles.rollout.partial import CUT_ENV, PartialBuffer, cut, cut_tokens
from miles.sample import Sample
from miles.spec.tables import RolloutConfig
from tests.unit.engine.server_harness import ServerThread

PROMPTS = [Prompt(i, f"data:{i}", f"{i}=", f"{i}=", [4 + i % 6, 5, 13]) for i in range(12)]
CUT = 3
MAX_LEN = 8


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path) -> Iterator[ServerThread]:
    torch.set_num_threads(1)
    s = ServerThread(Engine(tiny_model_dir, seed=0, max_batch_size=8), batch_wait_ms=0)
    yield s
    s.stop()


class Cursor:
    def __init__(self) -> None:
        self.offset = 0

    def sample(self, n: int) -> list[Prompt]:
        out = [PROMPTS[(self.offset + i) % len(PROMPTS)] for i in range(n)]
        self.offset += n
        return out


def cfg(**kw: object) -> RolloutConfig:
    base: dict[str, object] = {
        "rollout_batch_size": 1,
        "n_samples_per_prompt": 2,
        "over_sampling_batch_size": 2,
        "rollout_max_response_len": MAX_LEN,
        "rollout_stop_token_ids": [],
        "partial_rollout": True,
    }
    return RolloutConfig(**{**base, **kw})  # type: ignore[arg-type]


def run(
    srv: ServerThread,
    c: RolloutConfig,
    buffer: PartialBuffer,
    cursor: Cursor,
    rollout_id: int,
    version: int,
    chunk: int,
) -> FilledRollout:
    reward = RewardModel(per_sample=lambda s: float(len(s.response_ids)))

    async def go() -> FilledRollout:
        async with RolloutClient([srv.url], chunk_size=chunk) as client:
            return await fill(
                client, cursor.sample, reward, None, c, rollout_id, len(PROMPTS), buffer=buffer, weight_version=version
            )

    try:
        return asyncio.run(go())
    finally:
        reward.close()


def generate_directly(srv: ServerThread, c: RolloutConfig, ids: list[int], rollout_id: int, position: int) -> Sample:
    """What the engine answers for ``ids`` at sample ``position`` of rollout ``rollout_id``, with what is left."""
    sample = Sample(0, 0, "", "", ids)

    async def go() -> None:
        async with RolloutClient([srv.url]) as client:
            await client.generate([sample], c, rollout_id, first_index=position, max_new_tokens=MAX_LEN - CUT)

    asyncio.run(go())
    return sample


def test_a_cut_surplus_sample_is_continued_next_rollout_with_its_tokens_versions_and_mask(
    srv: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CUT_ENV, str(CUT))
    c = cfg(mask_offpolicy_in_partial_rollout=True)
    buffer, cursor = PartialBuffer(), Cursor()

    first = run(srv, c, buffer, cursor, rollout_id=4, version=0, chunk=2)
    # round of prompts 0, 1: prompt 0 is kept, prompt 1 ran to the end and was cut back to CUT tokens
    assert [s.prompt_index for s in first.samples] == [0, 0] and cursor.offset == 2
    assert [[s.prompt_index for s in g] for g in buffer.groups] == [[1, 1]]
    carried = [Sample(**vars(s)) for s in buffer.groups[0]]  # copies: the next rollout continues them in place
    assert all(len(s.response_ids) == CUT and s.finish_reason == "abort" for s in carried)
    assert all(s.version_spans == [[0, CUT, 0]] and len(s.response_logprobs) == CUT for s in carried)
    assert first.partial is not None and first.partial.groups_carried == 1 and first.partial.samples_carried == 2
    assert first.partial.offpolicy_token_frac == 0.0 and first.partial.staleness_max == 0.0

    second = run(srv, c, buffer, cursor, rollout_id=5, version=1, chunk=2)
    # the carried group opens the round (positions 0, 1); one new prompt (2) fills the round and is the surplus
    assert [s.prompt_index for s in second.samples] == [1, 1] and cursor.offset == 3
    assert second.counts.prompts_used == 1 and second.counts.groups_sampled == 2
    assert [[s.prompt_index for s in g] for g in buffer.groups] == [[2, 2]]
    for position, (before, after) in enumerate(zip(carried, second.samples, strict=True)):
        # the engine was sent prompt + the CUT tokens and generated at most what was left of the budget
        direct = generate_directly(srv, c, before.prompt_ids + before.response_ids, rollout_id=5, position=position)
        assert after.response_ids == before.response_ids + direct.response_ids
        assert after.response_logprobs[:CUT] == before.response_logprobs
        # the same tokens; their log-probs from a batch of one rather than two, equal up to float rounding
        assert after.response_logprobs[CUT:] == pytest.approx(direct.response_logprobs, abs=1e-4)
        assert len(after.response_ids) <= MAX_LEN and after.finish_reason in ("stop", "length")
        assert after.version_spans == [[0, CUT, 0], [CUT, len(after.response_ids), 1]]
        assert after.weight_version == 1
        # mask_offpolicy_in_partial_rollout: only the tail the rollout's own weights generated trains
        assert after.loss_mask == [0] * CUT + [1] * (len(after.response_ids) - CUT)
        assert after.reward == float(len(after.response_ids))  # scored on the whole response
    p = second.partial
    assert p is not None and p.samples_continued == 2 and p.groups_carried == 1
    tokens = sum(len(s.response_ids) for s in second.samples)
    assert p.offpolicy_token_frac == pytest.approx(2 * CUT / tokens)
    assert (p.staleness_mean, p.staleness_max) == (1.0, 1.0)
    assert second.metrics()["rollout/partial_samples_continued"] == 2.0


def test_without_the_mask_every_continued_token_trains(srv: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CUT_ENV, str(CUT))
    c = cfg()
    buffer, cursor = PartialBuffer(), Cursor()
    run(srv, c, buffer, cursor, rollout_id=4, version=0, chunk=2)
    second = run(srv, c, buffer, cursor, rollout_id=5, version=1, chunk=2)
    assert all(s.loss_mask is None and s.trained_mask() == [1] * len(s.response_ids) for s in second.samples)
    assert all(s.token_versions()[:CUT] == [0] * CUT for s in second.samples)


def test_aborted_surplus_is_kept_and_taken_first_next_rollout(srv: ServerThread) -> None:
    """No test setting: the abort stops the surplus wherever it is; every surplus group is kept, none lost."""
    c = cfg(rollout_batch_size=2, over_sampling_batch_size=10, rollout_max_response_len=64)
    buffer, cursor = PartialBuffer(), Cursor()
    first = run(srv, c, buffer, cursor, rollout_id=1, version=0, chunk=2)  # ten requests of one group each
    assert [s.prompt_index for s in first.samples] == [0, 0, 1, 1]
    assert [g[0].prompt_index for g in buffer.groups] == list(range(2, 10))
    assert first.partial is not None and first.partial.groups_carried == 8
    assert first.partial.samples_carried == first.samples_aborted >= 2  # the engine had most still running
    assert all(s.finish_reason in ("abort", "stop", "length") for g in buffer.groups for s in g)
    assert not srv.server._queue and not srv.server._running

    continued = sum(s.finish_reason == "abort" and bool(s.response_ids) for g in buffer.groups[:8] for s in g)
    second = run(srv, c, buffer, cursor, rollout_id=2, version=1, chunk=2)
    assert second.partial is not None and second.partial.samples_continued == continued
    # the eight carried groups open the round, two new prompts (10, 11) fill it; groups 2 and 3 are kept
    assert [s.prompt_index for s in second.samples] == [2, 2, 3, 3]
    assert second.counts.prompts_used == 2 and cursor.offset == 12
    assert [g[0].prompt_index for g in buffer.groups] == [4, 5, 6, 7, 8, 9, 10, 11]
    assert all(s.finish_reason in ("stop", "length") for s in second.samples)
    assert all(len(s.token_versions()) == len(s.response_ids) <= 64 for s in second.samples)


def test_the_buffer_round_trips_through_its_state() -> None:
    s = Sample(0, 7, "p", "p", [1, 2], response_ids=[3, 4, 5], finish_reason="abort", weight_version=2)
    buffer = PartialBuffer()
    buffer.put([[s]])
    assert s.version_spans == [[0, 3, 2]]
    again = PartialBuffer()
    again.load_state_dict(buffer.state_dict())
    assert again.groups == buffer.groups and again.take(5) == [[s]] and again.groups == []


def test_the_cut_setting_is_a_token_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CUT_ENV, raising=False)
    assert cut_tokens() is None
    monkeypatch.setenv(CUT_ENV, "4")
    assert cut_tokens() == 4
    monkeypatch.setenv(CUT_ENV, "four")
    with pytest.raises(UserError, match=f"{CUT_ENV}='four' must be a token count"):
        cut_tokens()


def test_a_cut_keeps_the_first_tokens_and_their_version_ranges() -> None:
    s = Sample(0, 0, "", "", [1], response_ids=[5, 6, 7, 8], response_logprobs=[-1.0, -2.0, -3.0, -4.0])
    s.version_spans, s.loss_mask, s.finish_reason = [[0, 2, 0], [2, 4, 1]], [0, 0, 1, 1], "stop"
    cut(s, 3, decode=lambda ids: "".join(map(str, ids)))
    assert (s.response_ids, s.response_logprobs, s.loss_mask) == ([5, 6, 7], [-1.0, -2.0, -3.0], [0, 0, 1])
    assert s.version_spans == [[0, 2, 0], [2, 3, 1]] and s.token_versions() == [0, 0, 1]
    assert (s.response_text, s.finish_reason) == ("567", "abort")
    cut(s, 5, decode=None)  # nothing past its length: left as it is
    assert s.response_ids == [5, 6, 7]


def test_a_carried_sample_at_the_length_limit_is_finished_without_a_request() -> None:
    full = Sample(0, 0, "", "", [1], response_ids=[5] * MAX_LEN, finish_reason="abort")
    done = Sample(0, 0, "", "", [1], response_ids=[5, 6], finish_reason="stop")

    async def go() -> None:
        async with RolloutClient(["http://127.0.0.1:9"], max_retries=0) as client:  # nothing listens: no request
            await client.generate([full, done], cfg(), rollout_id=0, continue_partial=True)

    asyncio.run(go())
    assert (full.finish_reason, full.response_ids) == ("length", [5] * MAX_LEN)
    assert (done.finish_reason, done.response_ids) == ("stop", [5, 6])
