"""The rollout client over real engine processes: fills samples, reproducible seeds, survives a dead engine."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from miles.engine.local import LocalEngine
from miles.job.ports import free_port
from miles.rollout.client import BlockingRolloutClient, RolloutClient, RolloutError, sample_seed, sampling_params
from miles.sample import Sample
from miles.spec.tables import RolloutConfig

CFG = RolloutConfig(rollout_temperature=1.0, rollout_max_response_len=12, rollout_seed=5, rollout_stop=["="])


def samples(n: int, engine_tokens: list[list[int]]) -> list[Sample]:
    return [
        Sample(
            group_index=i // 2,
            prompt_index=i // 2,
            prompt="",
            prompt_text="",
            prompt_ids=engine_tokens[i % len(engine_tokens)],
        )
        for i in range(n)
    ]


PROMPTS = [[4, 5, 13], [6, 7, 16], [8, 9, 10, 13]]


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Path) -> Iterator[list[LocalEngine]]:
    procs = LocalEngine.start_many(tiny_model_dir, 2)
    yield procs
    for p in procs:
        p.stop()


def test_seeds_and_sampling_params_follow_the_config() -> None:
    assert sample_seed(5, 3, 7) == sample_seed(5, 3, 7)
    assert len({sample_seed(5, r, i) for r in range(3) for i in range(50)}) == 150
    p = sampling_params(CFG, 9, temperature=0.0)
    assert p["temperature"] == 0.0 and p["sampling_seed"] == 9 and p["stop"] == ["="] and p["max_new_tokens"] == 12
    assert p["top_k"] == -1 and p["no_stop_trim"] is True


def test_generate_fills_samples_and_is_reproducible(engines: list[LocalEngine]) -> None:
    client = BlockingRolloutClient([e.url for e in engines], chunk_size=4)
    try:
        client.wait_healthy(60)
        first = samples(10, PROMPTS)
        client.generate(first, CFG, rollout_id=1)
        for s in first:
            assert s.response_ids and len(s.response_logprobs) == len(s.response_ids)
            assert s.finish_reason in ("stop", "length") and all(lp <= 0 for lp in s.response_logprobs)
            if s.finish_reason == "stop" and s.response_text.endswith("="):
                assert s.response_ids[-1] == 16  # "=" kept in the text (no_stop_trim), its token generated
        again = samples(10, PROMPTS)
        client.generate(again, CFG, rollout_id=1)
        assert [s.response_ids for s in again] == [s.response_ids for s in first]
        other = samples(10, PROMPTS)
        client.generate(other, CFG, rollout_id=2)
        assert [s.response_ids for s in other] != [s.response_ids for s in first]
    finally:
        client.close()


def test_health_deadline_and_invalid_requests_fail_clearly(engines: list[LocalEngine]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"

    async def health() -> None:
        async with RolloutClient([engines[0].url, dead]) as c:
            await c.wait_healthy(deadline_s=1.5, poll_s=0.2)

    with pytest.raises(RolloutError, match=r"1 engine\(s\) not healthy.*" + dead):
        asyncio.run(health())

    async def bad() -> None:
        async with RolloutClient([engines[0].url]) as c:
            await c.generate(samples(1, [[10**6]]), CFG, rollout_id=0)

    with pytest.raises(RolloutError, match="rejected the request"):
        asyncio.run(bad())


def test_unbatched_requests_carry_one_sample_each(engines: list[LocalEngine]) -> None:
    """``batched=False`` (a router in front): one single-prompt body per sample, same seeds, samples filled."""
    client = BlockingRolloutClient([engines[0].url], batched=False)
    try:
        first = samples(5, PROMPTS)
        client.generate(first, CFG, rollout_id=1)
        assert all(s.response_ids and len(s.response_logprobs) == len(s.response_ids) for s in first)
        again = samples(5, PROMPTS)
        client.generate(again, CFG, rollout_id=1)
        assert [s.response_ids for s in again] == [s.response_ids for s in first]
    finally:
        client.close()


def test_a_conversations_turns_stay_on_one_engine(engines: list[LocalEngine]) -> None:
    """Token in, token out over two engines: each turn is generated from the ids so far, on the engine of turn 1."""
    cfg = RolloutConfig(rollout_temperature=1.0, rollout_max_response_len=4, rollout_seed=9)

    async def conversation(client: RolloutClient, k: int) -> list[str]:
        ids, used = list(PROMPTS[k % len(PROMPTS)]), []
        for turn in range(3):
            out = await client.generate_turn(ids, sampling_params(cfg, seed=100 * k + turn), session=f"c{k}")
            assert len(out.logprobs) == len(out.output_ids) > 0
            ids += out.output_ids + [13]  # the engine's ids, then appended glue ("=")
            used.append(out.engine)
        return used

    async def run() -> list[list[str]]:
        async with RolloutClient([e.url for e in engines]) as client:
            return list(await asyncio.gather(*(conversation(client, k) for k in range(6))))

    routes = asyncio.run(run())
    assert all(len(set(r)) == 1 for r in routes), routes  # every turn on the engine of the first
    assert {r[0] for r in routes} == {e.url for e in engines}  # and conversations spread over both


def test_a_request_whose_engine_dies_finishes_on_another(engines: list[LocalEngine]) -> None:
    """Last in this module: it kills one of the module's engines."""
    doomed, survivor = engines
    cfg = RolloutConfig(rollout_temperature=1.0, rollout_max_response_len=100, rollout_seed=1)
    batch = samples(48, PROMPTS)
    killer = threading.Timer(0.3, doomed.kill)

    async def run() -> RolloutClient:
        client = RolloutClient(
            [doomed.url, survivor.url], chunk_size=1, max_concurrency=8, backoff_s=0.05, timeout_s=60
        )
        killer.start()
        await client.generate(batch, cfg, rollout_id=0)
        await client.close()
        return client

    t0 = time.monotonic()
    client = asyncio.run(run())
    assert doomed.proc.poll() is not None  # it really died mid-rollout
    assert client.retries >= 1
    assert all(s.response_ids and s.finish_reason in ("stop", "length") for s in batch)
    assert time.monotonic() - t0 < 120
