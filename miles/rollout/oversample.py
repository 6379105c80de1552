"""Dynamic sampling and over-sampling: fill a rollout with ``rollout_batch_size`` groups that pass a filter.

The synchronous loop draws exactly ``rollout_batch_size`` prompts and trains on
every group. With ``[rollout] dynamic_sampling_filter_path`` (DAPO's dynamic
sampling, :mod:`miles.reward.filters`) or ``over_sampling_batch_size`` set, the
driver instead works in *rounds*:

1. draw ``over_sampling_batch_size`` prompts (default ``rollout_batch_size``)
   and send all their groups to the engines at once, whole groups per request;
2. as requests come back, score their groups and ask the filter about each one,
   in draw order; the first ``rollout_batch_size`` groups that pass are the
   rollout;
3. once those are known, every request still running is aborted (SGLang's
   ``/abort_request`` by request id; the embedded engine serves the same call)
   and its groups are dropped as surplus;
4. if the round ends short, another round is drawn, until the batch is full or
   one pass over the dataset has been drawn for this rollout without filling it
   (then the run stops with an error naming the filter: the data cannot fill a
   batch).

What training consumes is unchanged: ``rollout_batch_size`` groups of
``n_samples_per_prompt`` samples, so the four-knob invariant holds. What is
*generated* grows: at least ``over_sampling_batch_size`` groups per rollout.

Exact resume: the kept groups are a pure function of the prompts drawn and the
seeds, never of timing. A group is judged only when every group drawn before it
has been judged, sampling seeds follow each sample's position in the rollout
(over all rounds), and the rounds start one after another, so the prompts drawn
(the dataset's cursor advances by all of them), the groups kept and the counts
in the metrics come out the same in every run. Which surplus requests had
finished before the abort reached them is timing, reported as perf only.

With ``[rollout] partial_rollout`` the surplus groups are not dropped but kept in
a :class:`~miles.rollout.partial.PartialBuffer`, and the next rollout's first
round takes them before drawing new prompts (:mod:`miles.rollout.partial`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from miles.data import expand_groups
from miles.data.dataset import Prompt
from miles.reward.filters import verdict
from miles.reward.model import RewardModel, RewardStats
from miles.rollout import partial
from miles.rollout.client import RolloutClient
from miles.rollout.partial import PartialBuffer, PartialStats
from miles.sample import Sample
from miles.spec.tables import RolloutConfig


def enabled(cfg: RolloutConfig) -> bool:
    """Whether the rollout is filled in rounds (a filter or an over-sampling batch size is set)."""
    return bool(cfg.dynamic_sampling_filter_path) or cfg.over_sampling_batch_size is not None


class DataExhausted(RuntimeError):
    """A rollout drew a whole pass over the dataset without filling its batch with groups that pass the filter."""


@dataclass
class FillCounts:
    """What filling one rollout took (all deterministic, so they go to ``metrics.jsonl``)."""

    prompts_used: int = 0
    """Prompts drawn from the dataset for this rollout (the cursor advanced by this many)."""
    groups_sampled: int = 0
    """Groups sent to the engines (every drawn prompt)."""
    groups_kept: int = 0
    """Groups in the rollout (``rollout_batch_size``)."""
    groups_dropped: int = 0
    """Groups judged before the batch was full that the filter dropped."""
    groups_surplus: int = 0
    """Groups drawn after the batch was full: aborted, or discarded if they had finished."""
    drop_reasons: dict[str, int] = field(default_factory=dict)
    """Dropped groups per reason the filter gave (``zero_std_1.0`` ...)."""

    def metrics(self) -> dict[str, float]:
        out = {
            "rollout/prompts_used": float(self.prompts_used),
            "rollout/groups_sampled": float(self.groups_sampled),
            "rollout/groups_kept": float(self.groups_kept),
            "rollout/groups_dropped": float(self.groups_dropped),
            "rollout/groups_surplus": float(self.groups_surplus),
        }
        out.update({f"rollout/dropped_{reason}": float(k) for reason, k in sorted(self.drop_reasons.items())})
        return out


@dataclass
class FilledRollout:
    """The rollout's kept samples (scored, ``group_index`` 0 .. rollout_batch_size-1) and what it took."""

    samples: list[Sample]
    reward: RewardStats
    """The reward's stats over the kept samples (what training sees)."""
    counts: FillCounts
    samples_aborted: int
    """Surplus samples that the abort stopped before they finished (timing: perf only)."""
    partial: PartialStats | None = None
    """What partial rollouts carried over and continued (``None`` without ``partial_rollout``)."""

    def metrics(self) -> dict[str, float]:
        """The reward's, the filling's and the partial rollouts' figures for ``metrics.jsonl``."""
        out = {**self.reward.metrics(), **self.counts.metrics()}
        if self.partial is not None:
            out.update(self.partial.metrics())
        return out

    def timing(self) -> dict[str, float]:
        """The wall-clock-dependent figures, under names the metrics log files as perf."""
        return {"rollout/aborted_samples_timing": float(self.samples_aborted)}


@dataclass
class _Request:
    groups: list[list[Sample]]
    first_index: int
    task: asyncio.Task[RewardStats | None]

    @property
    def samples(self) -> list[Sample]:
        return [s for g in self.groups for s in g]


async def fill(
    client: RolloutClient,
    draw: Callable[[int], Sequence[Prompt]],
    reward: RewardModel,
    keep: Callable[..., Any] | None,
    cfg: RolloutConfig,
    rollout_id: int,
    dataset_size: int,
    buffer: PartialBuffer | None = None,
    weight_version: int = 0,
) -> FilledRollout:
    """Draw rounds of prompts until ``cfg.rollout_batch_size`` groups pass ``keep`` (all pass when ``None``).

    ``buffer`` (``partial_rollout``): its groups open the first round and continue where they stopped, and the
    surplus goes back into it. ``weight_version``: the engines' weights, recorded on every sample they generate.
    """
    if cfg.partial_rollout != (buffer is not None):
        raise ValueError("fill takes a partial-rollout buffer exactly when [rollout] partial_rollout is set")
    need = cfg.rollout_batch_size
    assert need is not None
    n = cfg.n_samples_per_prompt or 1
    per_round = cfg.over_sampling_batch_size or need
    groups_per_request = max(1, client.chunk_size // n)
    counts = FillCounts()
    kept: list[list[Sample]] = []
    stats: list[RewardStats] = []
    aborted = 0
    position = 0  # of the next sample in this rollout: its seed and request id
    stats_partial = PartialStats() if buffer is not None else None
    cut_at = partial.cut_tokens() if buffer is not None else None
    carried = buffer.take(per_round) if buffer is not None else []
    surplus_groups: list[list[Sample]] = []
    while len(kept) < need:
        if counts.prompts_used >= max(dataset_size, per_round):
            raise DataExhausted(
                f"rollout {rollout_id}: drew {counts.prompts_used} prompts (a whole pass over the {dataset_size} "
                f"prompts of the dataset) and only {len(kept)} of rollout_batch_size = {need} groups passed "
                f"dynamic_sampling_filter_path = {cfg.dynamic_sampling_filter_path!r} ({counts.drop_reasons}). "
                "Fix: use data the model does not already solve (or fail) every time, raise "
                "n_samples_per_prompt, or lower rollout_batch_size"
            )
        prompts = list(draw(per_round - len(carried)))
        counts.prompts_used += len(prompts)
        fresh = expand_groups(prompts, n)
        groups = carried + [fresh[g * n : (g + 1) * n] for g in range(len(prompts))]
        counts.groups_sampled += len(groups)
        if stats_partial is not None:
            stats_partial.samples_continued += sum(
                partial.is_unfinished(s) and bool(s.response_ids) for g in carried for s in g
            )
        carried = []
        samples = [s for g in groups for s in g]
        before = [len(s.response_ids) if partial.is_unfinished(s) else 0 for s in samples]
        for s in samples:
            if not s.finish_reason or partial.is_unfinished(s):
                s.weight_version = weight_version  # the engine's report, when it gives one, replaces it
        stop = asyncio.Event()
        requests: list[_Request] = []
        for start in range(0, len(groups), groups_per_request):
            chunk = groups[start : start + groups_per_request]
            first = position + start * n
            job = _generate_and_score(client, [s for g in chunk for s in g], reward, cfg, rollout_id, first, stop)
            requests.append(_Request(chunk, first, asyncio.create_task(job)))
        position += len(samples)
        done_at: int | None = None
        try:
            done_at = await _judge_in_order(requests, keep, cfg, need, kept, stats, counts, surplus_groups)
        finally:
            stop.set()
            surplus = requests[done_at:] if done_at is not None else []
            running = [r for r in surplus if not r.task.done()] if cut_at is None else []
            if running:
                rids = [
                    f"{_rid_prefix(rollout_id)}-{r.first_index + i}" for r in running for i in range(len(r.samples))
                ]
                await client.abort(rids)
            results = await asyncio.gather(*(r.task for r in requests), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        for request in surplus:
            aborted += sum(s.finish_reason == "abort" for s in request.samples)
            surplus_groups += request.groups
        if cut_at is not None:  # the test setting: the surplus ran to the end; cut it where an abort would have
            assert buffer is not None
            start_of = {id(s): b for s, b in zip(samples, before, strict=True)}
            for s in (s for g in surplus_groups for s in g):
                partial.cut(s, start_of[id(s)] + cut_at, buffer.decode)
    for g, group in enumerate(kept):
        for s in group:
            s.group_index = g
    out = [s for g in kept for s in g]
    if buffer is not None and stats_partial is not None:
        buffer.put(surplus_groups)
        stats_partial.groups_carried = len(surplus_groups)
        stats_partial.samples_carried = sum(partial.is_unfinished(s) for g in surplus_groups for s in g)
        if buffer.decode is not None:
            for s in out:
                if len(s.version_spans) > 1:  # continued: its text decoded whole
                    s.response_text = buffer.decode(s.response_ids)
        partial.finish_kept(out, weight_version, cfg.mask_offpolicy_in_partial_rollout, stats_partial)
    return FilledRollout(
        samples=out, reward=_merge(stats, out), counts=counts, samples_aborted=aborted, partial=stats_partial
    )


def _rid_prefix(rollout_id: int) -> str:
    return f"miles-rollout-{rollout_id}"


async def _generate_and_score(
    client: RolloutClient,
    samples: list[Sample],
    reward: RewardModel,
    cfg: RolloutConfig,
    rollout_id: int,
    first_index: int,
    stop: asyncio.Event,
) -> RewardStats | None:
    """One request's groups: generated, then scored unless the batch filled meanwhile (``None`` then)."""
    await client.generate(
        samples,
        cfg,
        rollout_id,
        first_index=first_index,
        rid_prefix=_rid_prefix(rollout_id),
        stop=stop,
        continue_partial=cfg.partial_rollout,
    )
    if stop.is_set():
        return None
    return await reward.score(samples)


async def _judge_in_order(
    requests: list[_Request],
    keep: Callable[..., Any] | None,
    cfg: RolloutConfig,
    need: int,
    kept: list[list[Sample]],
    stats: list[RewardStats],
    counts: FillCounts,
    surplus: list[list[Sample]],
) -> int | None:
    """Judge the groups in draw order as their requests finish; the index of the first surplus request, if any.

    The groups of the last judged request that came after the batch was full are added to ``surplus``."""
    for k, request in enumerate(requests):
        scored = await request.task
        assert scored is not None  # stop is set only after the last judged request
        stats.append(scored)
        for g, group in enumerate(request.groups):
            if len(kept) == need:  # the rest of this request is surplus, judged by no one
                counts.groups_surplus += len(request.groups) - g
                surplus += request.groups[g:]
                break
            v = verdict(keep, cfg, group) if keep is not None else None
            if v is None or v.keep:
                kept.append(group)
                counts.groups_kept += 1
            else:
                counts.groups_dropped += 1
                reason = v.reason or "filtered"
                counts.drop_reasons[reason] = counts.drop_reasons.get(reason, 0) + 1
        if len(kept) == need:
            counts.groups_surplus += sum(len(r.groups) for r in requests[k + 1 :])
            return k + 1
    return None


def _merge(stats: list[RewardStats], kept: list[Sample]) -> RewardStats:
    """The reward's stats as the synchronous loop reports them, over the kept samples."""
    return RewardStats(
        count=len(kept),
        failed=sum(s.reward_failed for s in kept),
        mean=sum(s.reward for s in kept) / len(kept) if kept else 0.0,
        seconds=sum(s.seconds for s in stats),
        errors=[e for s in stats for e in s.errors][:5],
    )
