"""The reward model: spec wiring, custom functions (sync/async/group), remote URLs, failure counting."""

from __future__ import annotations

import asyncio
import math
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from miles.errors import UserError
from miles.reward import RewardModel, RewardStats
from miles.sample import Sample
from miles.spec.tables import RolloutConfig


def samples(responses: list[str], labels: list[Any] | None = None, group_size: int = 1) -> list[Sample]:
    labels = labels if labels is not None else [None] * len(responses)
    return [
        Sample(
            group_index=i // group_size,
            prompt_index=i // group_size,
            prompt=f"q{i}",
            prompt_text=f"q{i}",
            prompt_ids=[1],
            label=lab,
            response_text=r,
        )
        for i, (r, lab) in enumerate(zip(responses, labels, strict=True))
    ]


REWARDS_PY = '''
import asyncio

def by_length(sample):
    """sync, per sample"""
    return len(sample.response_text) / 10

async def async_match(sample):
    await asyncio.sleep(0.01)
    return {"score": float(sample.response_text == sample.label), "extra": "ignored"}

def miles_style(args, sample):
    """Miles' (args, sample) signature: args is the [rollout] table"""
    return args.rollout_seed + (1.0 if sample.response_text == "ok" else 0.0)

def rank_in_group(samples):
    """per group: 1 for the longest response, 0 for the rest"""
    longest = max(len(s.response_text) for s in samples)
    return [float(len(s.response_text) == longest) for s in samples]

async def async_group_mean(samples):
    n = sum(len(s.response_text) for s in samples)
    return [n / len(samples)] * len(samples)

def flaky(sample):
    if sample.response_text == "boom":
        raise RuntimeError("reward crashed")
    if sample.response_text == "nan":
        return float("nan")
    if sample.response_text == "text":
        return "high"
    if sample.response_text == "slow":
        import time
        time.sleep(1.0)
    return 1.0

async def async_hang(sample):
    if sample.response_text == "hang":
        await asyncio.sleep(30)
    return 2.0

def wrong_length(samples):
    return [1.0]

not_callable = 3
'''


@pytest.fixture
def reward_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent(REWARDS_PY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    return path


def run(model: RewardModel, batch: list[Sample]) -> RewardStats:
    try:
        return model.score_blocking(batch)
    finally:
        model.close()


def test_builtin_from_spec_and_stats() -> None:
    model = RewardModel.from_spec(RolloutConfig(rm_type="math"))
    batch = samples([r"\boxed{\frac{1}{2}}", r"\boxed{2}", r"\boxed{0.5}", "none"], ["0.5", "3", "1/2", "0"])
    stats = run(model, batch)
    assert [s.reward for s in batch] == [1.0, 0.0, 1.0, 0.0]
    assert (stats.count, stats.failed, stats.mean) == (4, 0, 0.5)
    assert stats.metrics() == {"reward/mean": 0.5, "reward/failed": 0.0, "reward/time_s": stats.seconds}


def test_metadata_rm_type_overrides_per_sample() -> None:
    batch = samples(["Paris", "Paris", r"\boxed{4}"], ["Paris", "Paris", "4"])
    batch[1].metadata = {"rm_type": "dapo"}  # no "Answer:" line: -1
    batch[2].metadata = {"rm_type": "nope"}
    stats = run(RewardModel.from_spec(RolloutConfig(rm_type="exact_match")), batch)
    assert [s.reward for s in batch] == [1.0, -1.0, 0.0]
    assert [s.reward_failed for s in batch] == [False, False, True]
    assert stats.failed == 1 and "'nope' is not a built-in reward" in stats.errors[0]


def test_spec_errors_name_the_key_and_list_builtins(reward_module: Path) -> None:
    with pytest.raises(
        UserError, match=r"rollout.rm_type = 'mathh' is not a built-in reward; choose one of math, gsm8k"
    ):
        RewardModel.from_spec(RolloutConfig(rm_type="mathh"))
    with pytest.raises(
        UserError, match=r"rollout.custom_rm_path = 'no_such_mod:f': cannot import .* Built-in rewards are: math"
    ):
        RewardModel.from_spec(RolloutConfig(custom_rm_path="no_such_mod:f"))
    with pytest.raises(UserError, match="has no callable 'missing'"):
        RewardModel.from_spec(RolloutConfig(custom_rm_path="my_rewards:missing"))
    with pytest.raises(UserError, match="has no callable 'not_callable'"):
        RewardModel.from_spec(RolloutConfig(custom_rm_path="my_rewards:not_callable"))
    with pytest.raises(UserError, match="expected 'module:function'"):
        RewardModel.from_spec(RolloutConfig(custom_rm_path="my_rewards.by_length"))
    with pytest.raises(UserError, match="no reward configured"):
        RewardModel.from_spec(RolloutConfig())
    with pytest.raises(UserError, match="group_rm needs rollout.custom_rm_path"):
        RewardModel.from_spec(RolloutConfig(rm_type="math", group_rm=True))
    with pytest.raises(UserError, match="set rollout.rm_url"):
        RewardModel.from_spec(RolloutConfig(rm_type="remote_rm"))


def test_custom_sync_async_and_miles_signature(reward_module: Path) -> None:
    batch = samples(["abcd", "ab"], ["abcd", "x"])
    run(RewardModel.from_spec(RolloutConfig(custom_rm_path="my_rewards:by_length")), batch)
    assert [s.reward for s in batch] == [0.4, 0.2]
    run(RewardModel.from_spec(RolloutConfig(custom_rm_path="my_rewards:async_match", reward_key="score")), batch)
    assert [s.reward for s in batch] == [1.0, 0.0]
    batch = samples(["ok", "no"])
    run(RewardModel.from_spec(RolloutConfig(custom_rm_path="my_rewards:miles_style", rollout_seed=5)), batch)
    assert [s.reward for s in batch] == [6.0, 5.0]


def test_custom_file_path_form(reward_module: Path, tmp_path: Path) -> None:
    batch = samples(["abcde"])
    run(RewardModel.from_spec(RolloutConfig(custom_rm_path=f"{reward_module}:by_length")), batch)
    assert batch[0].reward == 0.5
    # relative to the spec's directory
    run(RewardModel.from_spec(RolloutConfig(custom_rm_path="my_rewards.py:by_length"), base_dir=tmp_path), batch)
    assert batch[0].reward == 0.5
    with pytest.raises(UserError, match="no such file"):
        RewardModel.from_spec(RolloutConfig(custom_rm_path="absent.py:f"), base_dir=tmp_path)
    broken = tmp_path / "broken.py"
    broken.write_text("raise ValueError('bad import')\n")
    with pytest.raises(UserError, match="executing .*broken.py' failed: ValueError: bad import"):
        RewardModel.from_spec(RolloutConfig(custom_rm_path=f"{broken}:f"))


def test_group_rewards(reward_module: Path) -> None:
    batch = samples(["a", "abc", "ab", "xy", "x", "xyz"], group_size=3)
    run(RewardModel.from_spec(RolloutConfig(custom_rm_path="my_rewards:rank_in_group", group_rm=True)), batch)
    assert [s.reward for s in batch] == [0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    run(RewardModel.from_spec(RolloutConfig(custom_rm_path="my_rewards:async_group_mean", group_rm=True)), batch)
    assert [s.reward for s in batch] == [2.0] * 6
    stats = run(RewardModel.from_spec(RolloutConfig(custom_rm_path="my_rewards:wrong_length", group_rm=True)), batch)
    assert stats.failed == 6 and all(s.reward_failed and s.reward == 0.0 for s in batch)
    assert "one reward per sample (3), got 1 values" in stats.errors[0]


def test_failures_are_scored_zero_and_counted(reward_module: Path) -> None:
    batch = samples(["fine", "boom", "nan", "text", "slow", "fine"])
    model = RewardModel.from_spec(RolloutConfig(custom_rm_path="my_rewards:flaky", rm_timeout=0.3))
    stats = run(model, batch)
    assert [s.reward for s in batch] == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert [s.reward_failed for s in batch] == [False, True, True, True, True, False]
    assert stats.failed == 4 and stats.mean == pytest.approx(2 / 6)
    text = " | ".join(stats.errors)
    assert "RuntimeError: reward crashed" in text and "not finite" in text
    assert "must be a number" in text and "timed out after 0.3s" in text


def test_async_timeout_and_dict_without_reward_key(reward_module: Path) -> None:
    batch = samples(["hang", "quick"])
    stats = run(RewardModel.from_spec(RolloutConfig(custom_rm_path="my_rewards:async_hang", rm_timeout=0.2)), batch)
    assert [s.reward for s in batch] == [0.0, 2.0] and stats.failed == 1
    assert stats.seconds < 5
    stats = run(RewardModel.from_spec(RolloutConfig(custom_rm_path="my_rewards:async_match")), batch)
    assert stats.failed == 2 and "set rollout.reward_key" in stats.errors[0]
    stats = run(RewardModel.from_spec(RolloutConfig(custom_rm_path="my_rewards:async_match", reward_key="acc")), batch)
    assert stats.failed == 2 and "no key 'acc'" in stats.errors[0]


def test_concurrency_is_bounded() -> None:
    active, peak = 0, 0

    async def tracked(sample: Sample) -> float:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.02)
        active -= 1
        return 1.0

    stats = run(RewardModel(per_sample=tracked, concurrency=3), samples(["x"] * 12))
    assert stats.mean == 1.0 and peak == 3


# --- remote reward over a real aiohttp server on 127.0.0.1 -------------------------------------------------------


async def with_server(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]], body: Callable[[str], Awaitable[Any]]
) -> Any:
    app = web.Application()
    app.router.add_post("/score", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        return await body(f"http://127.0.0.1:{port}/score")
    finally:
        await runner.cleanup()


def test_remote_reward_payload_and_reward_key() -> None:
    seen: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        payload = await request.json()
        seen.append(payload)
        return web.json_response({"score": float(payload["response"] == payload["label"]), "why": "compared"})

    async def body(url: str) -> RewardStats:
        model = RewardModel.from_spec(RolloutConfig(rm_url=url, reward_key="score"))
        batch = samples(["4", "5"], ["4", "4"])
        batch[0].metadata = {"task": "add"}
        stats = await model.score(batch)
        assert [s.reward for s in batch] == [1.0, 0.0]
        return stats

    stats = asyncio.run(with_server(handler, body))
    assert stats.failed == 0
    by_response = {p["response"]: p for p in seen}
    assert by_response["4"] == {
        "prompt": "q0",
        "prompt_text": "q0",
        "response": "4",
        "label": "4",
        "metadata": {"task": "add"},
    }


def test_remote_retries_transient_errors_and_fails_on_4xx() -> None:
    calls: dict[str, int] = {}

    async def handler(request: web.Request) -> web.Response:
        payload = await request.json()
        key = payload["response"]
        calls[key] = calls.get(key, 0) + 1
        if key == "flaky" and calls[key] <= 2:
            return web.Response(status=503, text="warming up")
        if key == "bad":
            return web.Response(status=422, text="no label")
        if key == "down":
            return web.Response(status=500, text="broken")
        if key == "slow":
            await asyncio.sleep(1.2)
        return web.json_response(0.75)

    async def body(url: str) -> RewardStats:
        model = RewardModel.from_spec(RolloutConfig(rm_url=url, rm_timeout=0.5))
        assert model.remote is not None
        model.remote.backoff = 0.01
        batch = samples(["flaky", "bad", "down", "slow", "plain"])
        stats = await model.score(batch)
        assert [s.reward for s in batch] == [0.75, 0.0, 0.0, 0.0, 0.75]
        assert [s.reward_failed for s in batch] == [False, True, True, True, False]
        return stats

    stats = asyncio.run(with_server(handler, body))
    assert stats.failed == 3
    assert calls["flaky"] == 3 and calls["bad"] == 1 and calls["down"] == 4 and calls["slow"] == 4
    text = " | ".join(stats.errors)
    assert "HTTP 422" in text and "HTTP 500" in text and "TimeoutError" in text


def test_remote_unreachable_counts_failures() -> None:
    model = RewardModel.from_spec(RolloutConfig(rm_url="http://127.0.0.1:9/score", rm_timeout=0.5))
    assert model.remote is not None
    model.remote.backoff = 0.01
    batch = samples(["a", "b"])
    stats = run(model, batch)
    assert stats.failed == 2 and not any(math.isnan(s.reward) for s in batch)
    assert "failed 4 times" in stats.errors[0]


def test_runaway_builtin_is_killed_and_the_pool_recovers() -> None:
    # sympy would compute 9^(9^(9^9)) forever while holding the GIL; the worker process is killed instead
    model = RewardModel.from_spec(RolloutConfig(rm_type="math", rm_timeout=3.0))
    scorer = model.per_sample
    try:
        batch = samples([r"\boxed{9^{9^{9^{9}}}}", r"\boxed{3}", r"\boxed{\frac{6}{2}}"], ["3", "3", "3"])
        stats = model.score_blocking(batch)
        assert [s.reward for s in batch] == [0.0, 1.0, 1.0]
        assert [s.reward_failed for s in batch] == [True, False, False]
        assert "timed out after 3s" in stats.errors[0]
        again = samples([r"\boxed{3}"], ["3"])
        assert model.score_blocking(again).mean == 1.0  # a fresh worker replaced the killed one
        processes = [w.process for w in scorer.pool._all]  # type: ignore[union-attr]
    finally:
        model.close()
    assert processes and not any(p.is_alive() for p in processes)
