"""Evaluation: the engines answer every ``[eval]`` dataset with the current weights; nothing of it feeds training.

When: before the first rollout (unless ``skip_eval_before_train``), after every ``eval_interval`` rollouts, and
after the last rollout (the final model; Miles does the same). An
evaluation is named by its *step*, the number of rollouts trained into the weights it evaluates (the engines'
weight version), so step 0 is the initial model and step ``s`` follows rollout ``s - 1``'s weight sync.

A run with evaluation trains bit-identically to the same run without it, because evaluation touches nothing training
reads: its prompts come from their own datasets in file order (the training data cursor does not move); its sampling
seeds live in their own namespace (negative rollout ids, :func:`seed_namespace`); no trainer RNG is drawn; the
reward is the run's, whose scores of eval samples go nowhere but the eval metrics.

Preemption: the run state records the last evaluated step (:class:`miles.session.checkpoint.RunState`), saved with
every checkpoint, so a resumed run neither skips an evaluation that was due nor repeats one that ran.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from miles.data import expand_groups
from miles.data.dataset import PromptDataset
from miles.sample import Sample
from miles.session.components import Components
from miles.spec.tables import Spec


@dataclass(frozen=True)
class EvalSettings:
    """What evaluation needs from the spec: datasets, cadence, samples per prompt, sampling overrides."""

    datasets: tuple[str, ...]
    interval: int | None
    before_train: bool
    n_samples: int
    overrides: dict[str, Any]
    """Sampling params that replace the rollout's (``temperature``, ``top_p``, ``top_k``, ``max_new_tokens``)."""

    @classmethod
    def from_spec(cls, spec: Spec) -> EvalSettings:
        ev = spec.eval
        overrides = {
            "temperature": ev.eval_temperature,
            "top_p": ev.eval_top_p,
            "top_k": ev.eval_top_k,
            "max_new_tokens": ev.eval_max_response_len,
        }
        return cls(
            datasets=tuple(ev.eval_prompt_data),
            interval=ev.eval_interval,
            before_train=not ev.skip_eval_before_train,
            n_samples=ev.n_samples_per_eval_prompt,
            overrides={k: v for k, v in overrides.items() if v is not None},
        )

    def due(self, step: int, num_rollout: int) -> bool:
        """Whether the weights after ``step`` of the run's ``num_rollout`` rollouts are evaluated."""
        if self.interval is None or not self.datasets:
            return False
        return self.before_train if step == 0 else step % self.interval == 0 or step == num_rollout


def seed_namespace(step: int, dataset_index: int, num_datasets: int) -> int:
    """The rollout id whose sampling seeds an evaluation's requests use: negative, so never a training rollout's,
    and distinct for every (step, dataset)."""
    return -1 - (step * num_datasets + dataset_index)


def dataset_metrics(name: str, samples: list[Sample], k: int) -> dict[str, float]:
    """One dataset's figures over its samples (``k`` per prompt, grouped contiguously).

    A sample counts as solved when its reward is positive (1 for a correct answer under the built-in rewards).
    ``pass@k``: the fraction of prompts with at least one solved sample among their ``k``; ``avg@k``: the fraction
    of solved samples (the mean of per-prompt solve rates); ``reward_mean``: the raw mean reward.
    """
    groups = [samples[i : i + k] for i in range(0, len(samples), k)]
    solved = [[s.reward > 0 for s in g] for g in groups]
    prefix = f"eval/{name}"
    return {
        f"{prefix}/reward_mean": statistics.fmean(s.reward for s in samples),
        f"{prefix}/pass@{k}": statistics.fmean(1.0 if any(g) else 0.0 for g in solved),
        f"{prefix}/avg@{k}": statistics.fmean(statistics.fmean(1.0 if x else 0.0 for x in g) for g in solved),
        f"{prefix}/response_len_mean": statistics.fmean(len(s.response_ids) for s in samples),
        f"{prefix}/truncated_frac": statistics.fmean(1.0 if s.finish_reason == "length" else 0.0 for s in samples),
        f"{prefix}/prompts": float(len(groups)),
    }


def evaluate(
    engines: Any, reward: Any, datasets: dict[str, PromptDataset], settings: EvalSettings, step: int, version: int
) -> dict[str, float]:
    """Every dataset answered ``n_samples`` times per prompt by ``engines`` and scored by ``reward``."""
    out: dict[str, float] = {}
    names = list(datasets)
    for index, name in enumerate(names):
        samples = expand_groups(list(datasets[name]), settings.n_samples)
        rollout_id = seed_namespace(step, index, len(names))
        engines.generate(samples, rollout_id=rollout_id, weight_version=version, evaluation=True, **settings.overrides)
        reward.score_blocking(samples)
        out.update(dataset_metrics(name, samples, settings.n_samples))
    return out


def run_if_due(parts: Components, spec: Spec, step: int, evaluated: int | None) -> dict[str, float] | None:
    """Collective: evaluate the weights after ``step`` rollouts when due and not already done (``evaluated`` is the
    last step evaluated, from the run state). Returns the metrics on the driver, ``{}`` on the other ranks, and
    ``None`` when nothing ran.

    Colocated actors that leave the GPU for the engines (``offload_train``) do so around the evaluation too.
    """
    settings = EvalSettings.from_spec(spec)
    if not settings.due(step, parts.num_rollout) or evaluated == step:
        return None
    if parts.offload_train:
        parts.actor.offload()
    values: dict[str, float] = {}
    if parts.driver is not None:
        d = parts.driver
        values = evaluate(d.engines, d.reward, d.eval_data, settings, step, version=step)
    if parts.offload_train:
        parts.actor.onload()
    return values


def table(values: dict[str, float]) -> str:
    """The evaluation's figures as a text table: one row per dataset."""
    names = sorted({k.split("/")[1] for k in values if k.startswith("eval/")})
    columns = sorted({k.split("/", 2)[2] for k in values if k.startswith("eval/")}, key=_column_order)
    head = ["dataset", *columns]
    rows = [[n, *(f"{values.get(f'eval/{n}/{c}', float('nan')):.4g}" for c in columns)] for n in names]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in [head, *rows])


def _column_order(column: str) -> tuple[int, str]:
    order = ("reward_mean", "pass@", "avg@", "response_len_mean", "truncated_frac", "prompts")
    return next((i for i, p in enumerate(order) if column.startswith(p)), len(order)), column
