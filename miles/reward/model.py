"""The reward model of a run: scores a rollout's samples in place, never killing the run.

One object per run, built from ``[rollout]``::

    reward = RewardModel.from_spec(spec.rollout)
    stats = await reward.score(samples)     # fills sample.reward / sample.reward_failed
    metrics.update(stats.metrics())

Exactly one source is configured: a built-in ``rm_type``, a ``custom_rm_path``
(per sample, or per group with ``group_rm``) or an ``rm_url``. A reward that
raises, times out, or returns something that is not a finite number is a
*failed* sample: reward 0.0, ``reward_failed = True``, counted in
``RewardStats.failed``. One bad response (or a flaky reward service) must not
cost a multi-day run; the count in the metrics makes a systematic failure
visible at once.

Built-in rules run in worker processes (``miles.reward.workers``) that are
killed when a call overruns ``rm_timeout``: sympy can spin forever on a
pathological answer. Custom sync functions run in a small thread pool so that
a slow one can be timed out without blocking the event loop (its thread is
abandoned, not killed: Python cannot kill threads). Async functions and HTTP
calls run on the loop. ``rm_concurrency`` bounds calls in flight.
"""

from __future__ import annotations

import asyncio
import logging
import math
import numbers
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from miles.errors import UserError
from miles.reward.builtin import builtin_names, resolve_rule, score_rule
from miles.reward.custom import is_async, load_function, wants_config
from miles.reward.remote import RemoteReward
from miles.reward.workers import WorkerPool
from miles.sample import Sample, split_groups

if TYPE_CHECKING:
    from miles.spec.tables import RolloutConfig

logger = logging.getLogger(__name__)

MAX_LOGGED_ERRORS = 5
"""Failure messages kept (and logged) per ``score`` call; the rest are only counted."""


class RewardFailure(Exception):
    """A reward result that cannot be turned into a float (wrong type, NaN, missing ``reward_key``)."""


@dataclass
class RewardStats:
    """What one ``score`` call did, for the loop's metrics and logs."""

    count: int = 0
    """Samples scored (failed ones included)."""

    failed: int = 0
    """Samples whose reward raised, timed out or returned a non-number; each scored 0.0."""

    mean: float = 0.0
    """Mean reward over all samples, failed ones counted as 0.0."""

    seconds: float = 0.0
    """Wall time of the call."""

    errors: list[str] = field(default_factory=list)
    """The first few failure messages (``MAX_LOGGED_ERRORS``), each prefixed by the sample's prompt index."""

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        """Flat metrics for metrics.jsonl / TensorBoard."""
        return {
            f"{prefix}/mean": self.mean,
            f"{prefix}/failed": float(self.failed),
            f"{prefix}/time_s": self.seconds,
        }


def to_reward(raw: Any, reward_key: str) -> float:
    """A reward function's result as a finite float; a dict result is indexed by ``reward_key``."""
    if isinstance(raw, Mapping):
        if not reward_key:
            raise RewardFailure(
                f"the reward returned a dict with keys {sorted(map(str, raw))}; set rollout.reward_key to the one "
                "that holds the reward"
            )
        if reward_key not in raw:
            raise RewardFailure(
                f"the reward's result has no key {reward_key!r} (rollout.reward_key); keys: {sorted(map(str, raw))}"
            )
        raw = raw[reward_key]
    if isinstance(raw, numbers.Real):  # bool, int, float and numpy scalars
        value = float(raw)
        if math.isfinite(value):
            return value
        raise RewardFailure(f"the reward is not finite: {value}")
    raise RewardFailure(
        f"the reward must be a number (or a dict with rollout.reward_key), got {type(raw).__name__}: {raw!r:.80}"
    )


SampleFn = Callable[[Sample], Awaitable[Any]]
GroupFn = Callable[[list[Sample]], Awaitable[list[Any]]]


class RewardModel:
    """Scores samples with one configured reward source; see the module docstring for the failure rules."""

    def __init__(
        self,
        *,
        per_sample: Callable[[Sample], Any] | None = None,
        per_group: Callable[[list[Sample]], Any] | None = None,
        remote: RemoteReward | None = None,
        config: Any = None,
        reward_key: str = "",
        timeout: float = 60.0,
        concurrency: int = 32,
        name: str = "",
    ) -> None:
        """Prefer :meth:`from_spec`; this takes exactly one of ``per_sample``, ``per_group`` or ``remote``.

        ``per_sample(sample)`` / ``per_group(samples)`` may be sync or async; a
        function of two positional parameters gets ``config`` (the
        ``[rollout]`` table) first, like Miles' ``f(args, sample)``.
        """
        if sum(x is not None for x in (per_sample, per_group, remote)) != 1:
            raise ValueError("give exactly one of per_sample, per_group or remote")
        self.per_sample = per_sample
        self.per_group = per_group
        self.remote = remote
        self.config = config
        self.reward_key = reward_key
        self.timeout = timeout
        self.concurrency = concurrency
        self.name = name or getattr(per_sample or per_group, "__name__", "remote")
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def from_spec(cls, rollout: RolloutConfig, base_dir: str | Path | None = None) -> RewardModel:
        """The reward of ``[rollout]``: ``rm_type``, ``custom_rm_path`` (+ ``group_rm``) or ``rm_url``.

        ``base_dir`` (the spec file's directory) anchors a relative
        ``custom_rm_path = "file.py:function"``.
        """
        common: dict[str, Any] = {
            "config": rollout,
            "reward_key": rollout.reward_key,
            "timeout": rollout.rm_timeout,
            "concurrency": rollout.rm_concurrency,
        }
        if rollout.custom_rm_path:
            fn = load_function(rollout.custom_rm_path, "rollout.custom_rm_path", builtin_names(), base_dir)
            if rollout.group_rm:
                return cls(per_group=fn, name=rollout.custom_rm_path, **common)
            return cls(per_sample=fn, name=rollout.custom_rm_path, **common)
        if rollout.group_rm:
            raise UserError("rollout.group_rm needs rollout.custom_rm_path (a function that scores a whole group)")
        if rollout.rm_url:
            remote = RemoteReward(rollout.rm_url, timeout=rollout.rm_timeout)
            return cls(remote=remote, name=rollout.rm_url, **common)
        if rollout.rm_type == "remote_rm":
            raise UserError('rollout.rm_type = "remote_rm": set rollout.rm_url = "http://host:port/path" instead')
        if not rollout.rm_type:
            raise UserError(
                f"no reward configured: set rollout.rm_type to one of {builtin_names()}, "
                "or rollout.custom_rm_path, or rollout.rm_url"
            )
        rule = resolve_rule(rollout.rm_type)
        if rule is None:
            raise UserError(
                f"rollout.rm_type = {rollout.rm_type!r} is not a built-in reward; choose one of "
                f"{builtin_names()}, or write your own and set rollout.custom_rm_path"
            )
        scorer = _RuleScorer(rollout.rm_type, rollout.rm_timeout, rollout.rm_concurrency)
        return cls(per_sample=scorer, name=rollout.rm_type, **common)

    # --- scoring ------------------------------------------------------------------------------

    async def score(self, samples: Sequence[Sample]) -> RewardStats:
        """Fill ``reward`` and ``reward_failed`` of every sample in place; return counts for metrics."""
        start = time.perf_counter()
        stats = RewardStats(count=len(samples))
        semaphore = asyncio.Semaphore(self.concurrency)
        for s in samples:
            s.reward, s.reward_failed = 0.0, False
        session = aiohttp.ClientSession() if self.remote is not None else None
        try:
            if self.per_group is not None:
                groups = split_groups(samples)
                await asyncio.gather(*(self._score_group(g, semaphore, stats) for g in groups))
            else:
                await asyncio.gather(*(self._score_one(s, semaphore, stats, session) for s in samples))
        finally:
            if session is not None:
                await session.close()
        stats.failed = sum(s.reward_failed for s in samples)
        stats.mean = sum(s.reward for s in samples) / len(samples) if samples else 0.0
        stats.seconds = time.perf_counter() - start
        if stats.failed:
            logger.warning(
                "reward %s failed for %d of %d samples (scored 0.0); first errors: %s",
                self.name,
                stats.failed,
                stats.count,
                "; ".join(stats.errors),
            )
        return stats

    def score_blocking(self, samples: Sequence[Sample]) -> RewardStats:
        """``score`` for callers without an event loop (runs one with ``asyncio.run``)."""
        return asyncio.run(self.score(samples))

    async def _score_one(
        self, sample: Sample, semaphore: asyncio.Semaphore, stats: RewardStats, session: aiohttp.ClientSession | None
    ) -> None:
        async with semaphore:
            try:
                if self.remote is not None:
                    assert session is not None
                    raw = await self.remote(session, sample)  # the remote applies rm_timeout per attempt
                elif isinstance(self.per_sample, _RuleScorer):
                    raw = await self.per_sample(sample)  # times each call itself, excluding queueing and start-up
                else:
                    assert self.per_sample is not None
                    raw = await self._call(self.per_sample, sample)
                sample.reward = to_reward(raw, self.reward_key)
            except Exception as exc:
                self._fail([sample], exc, stats)

    async def _score_group(self, group: list[Sample], semaphore: asyncio.Semaphore, stats: RewardStats) -> None:
        async with semaphore:
            try:
                assert self.per_group is not None
                raw = await self._call(self.per_group, group)
                if not isinstance(raw, Sequence) or isinstance(raw, str | bytes) or len(raw) != len(group):
                    got = f"{len(raw)} values" if isinstance(raw, Sequence) else type(raw).__name__
                    raise RewardFailure(f"a group reward must return one reward per sample ({len(group)}), got {got}")
                rewards = [to_reward(r, self.reward_key) for r in raw]
            except Exception as exc:
                self._fail(group, exc, stats)
                return
            for s, r in zip(group, rewards, strict=True):
                s.reward = r

    async def _call(self, fn: Callable[..., Any], arg: Any) -> Any:
        """Call a sync or async ``fn`` on ``arg`` under ``rm_timeout``."""
        args = (self.config, arg) if wants_config(fn) else (arg,)
        if is_async(fn):
            return await asyncio.wait_for(fn(*args), self.timeout)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(self.concurrency, 4), thread_name_prefix="miles-reward")
        loop = asyncio.get_running_loop()
        result = await asyncio.wait_for(loop.run_in_executor(self._pool, lambda: fn(*args)), self.timeout)
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            result = await asyncio.wait_for(result, self.timeout)
        return result

    def _fail(self, samples: Sequence[Sample], exc: BaseException, stats: RewardStats) -> None:
        timed_out = isinstance(exc, asyncio.TimeoutError | TimeoutError)  # distinct types before Python 3.11
        reason = f"timed out after {self.timeout:g}s" if timed_out else f"{type(exc).__name__}: {exc}"
        for s in samples:
            s.reward, s.reward_failed = 0.0, True
        if len(stats.errors) < MAX_LOGGED_ERRORS:
            stats.errors.append(f"prompt {samples[0].prompt_index}: {reason}")

    def close(self) -> None:
        """Stop worker processes and release worker threads (an abandoned hung sync call keeps its thread)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if isinstance(self.per_sample, _RuleScorer):
            self.per_sample.pool.close()


class _RuleScorer:
    """A built-in rule as an async per-sample function, run in a killable worker process.

    ``metadata["rm_type"]`` may pick another built-in per sample, so one
    dataset can mix tasks (math and QA records, say), as Miles allows.
    """

    def __init__(self, rm_type: str, timeout: float, concurrency: int) -> None:
        self.rm_type = rm_type
        self.timeout = timeout
        self.pool = WorkerPool(size=min(concurrency, max(1, min(8, (os.cpu_count() or 2) // 2))))
        self.__name__ = rm_type

    async def __call__(self, sample: Sample) -> float:
        meta = sample.metadata if isinstance(sample.metadata, dict) else {}
        rm_type = str(meta.get("rm_type") or self.rm_type)
        if resolve_rule(rm_type) is None:
            raise RewardFailure(f"metadata rm_type {rm_type!r} is not a built-in reward ({builtin_names()})")
        args = (rm_type, sample.response_text, sample.label, meta)
        return float(await self.pool.call(score_rule, *args, timeout=self.timeout))
