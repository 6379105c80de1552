"""What a run reports: metrics.jsonl, TensorBoard events, W&B, a PNG plot and a console line.

Two streams, kept apart on purpose:

* ``metrics.jsonl``: one line per rollout of quantities that are a pure function of
  the run (reward, KL, entropy, lengths, losses). A run interrupted and resumed
  writes the same file bit for bit as one that never was, which is how exact resume
  is tested.
* ``perf.jsonl``: wall-clock figures (seconds per phase, tokens/s). They differ
  between any two runs and never enter ``metrics.jsonl``.

Evaluations (:mod:`miles.session.evaluation`) are lines of their own in ``metrics.jsonl``,
``{"eval_step": s, "eval/<dataset>/<figure>": ...}``, ``s`` the number of rollouts trained into the
evaluated weights; TensorBoard has them at step ``s``, and a rollout's metrics and perf figures at
step ``rollout_id``; W&B (:mod:`miles.session.wandb_sink`) draws them against the same numbers.

On resume, lines of rollouts at or after the resume point, and of evaluations after the
last one the checkpoint records, are dropped first, so a rollout or evaluation that ran
after the last checkpoint and was lost is not counted twice. Only the driver (trainer
rank 0) writes.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from miles.sample import Sample
from miles.session.wandb_sink import WandbSink
from miles.spec.tables import Spec

WALL_CLOCK_SUFFIXES = ("time_s", "_timing")
"""Names of figures that depend on timing (seconds; how many surplus samples an abort caught mid-flight)."""


def _kept(row: dict[str, Any], start_rollout: int, evaluated: int | None) -> bool:
    if "eval_step" in row:
        return evaluated is not None and row["eval_step"] <= evaluated
    return bool(row["rollout_id"] < start_rollout)


def _truncate_jsonl(path: Path, start_rollout: int, evaluated: int | None = None) -> list[dict[str, Any]]:
    """Drop the lines a resume redoes; returns the rows kept."""
    if not path.exists():
        return []
    keep, rows = [], []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            if _kept(row, start_rollout, evaluated):
                keep.append(line)
                rows.append(row)
        except (ValueError, KeyError):
            break  # a torn last line from a kill: drop it and everything after
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)
    return rows


class MetricsLog:
    """Writes a run's metrics; create one on the driver only."""

    def __init__(
        self,
        run_dir: Path,
        start_rollout: int,
        tensorboard: bool,
        plot: bool,
        evaluated: int | None = None,
        wandb: WandbSink | None = None,
    ) -> None:
        """``start_rollout`` and ``evaluated`` (the last evaluation's step) are the resumed state's; ``wandb``
        receives what TensorBoard does, and is closed with this log."""
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.perf_path = run_dir / "perf.jsonl"
        kept = _truncate_jsonl(self.metrics_path, start_rollout, evaluated)
        _truncate_jsonl(self.perf_path, start_rollout)
        self.plot_enabled = plot
        self.wandb = wandb
        self._tb: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_rollout)
            for row in kept:  # the purge also took kept evaluations at or after start_rollout: write them again
                if row.get("eval_step", -1) >= start_rollout:
                    self._tb_add(row, row["eval_step"])

    @classmethod
    def of_run(cls, spec: Spec, run_dir: Path, start_rollout: int, evaluated: int | None) -> MetricsLog:
        """The sinks ``spec`` asks for ([run] use_tensorboard, plot, use_wandb), past the resume point's lines."""
        wandb = WandbSink.open(spec, run_dir) if spec.run.use_wandb else None
        return cls(run_dir, start_rollout, spec.run.use_tensorboard, spec.run.plot, evaluated, wandb=wandb)

    def log(self, rollout_id: int, metrics: dict[str, float], perf: dict[str, float]) -> None:
        """Append one rollout's metrics and perf figures, then refresh the plot."""
        for path, values in ((self.metrics_path, metrics), (self.perf_path, perf)):
            with path.open("a") as f:
                f.write(json.dumps({"rollout_id": rollout_id, **values}, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self._tb_add({**metrics, **perf}, rollout_id)
        if self.wandb is not None:
            self.wandb.log_rollout(rollout_id, {**metrics, **perf})
        if self.plot_enabled:
            self.plot()

    def log_eval(self, step: int, values: dict[str, float]) -> None:
        """Append one evaluation's figures (``step``: rollouts trained into the evaluated weights)."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"eval_step": step, **values}, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._tb_add(values, step)
        if self.wandb is not None:
            self.wandb.log_eval(step, values)
        if self.plot_enabled:
            self.plot()

    def _tb_add(self, values: dict[str, Any], step: int) -> None:
        if self._tb is None:
            return
        for k, v in values.items():
            if k not in ("rollout_id", "eval_step"):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def plot(self) -> Path:
        """Draw reward, KL, entropy and response length per rollout into ``plot.png``, with each evaluation
        dataset's mean reward and response length beside the training ones."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        every = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]
        rows = [r for r in every if "rollout_id" in r]
        evals = [r for r in every if "eval_step" in r]
        panels = [
            ("rollout/reward_mean", "mean reward", "reward_mean"),
            ("train/kl_loss", "KL to reference", None),
            ("train/entropy", "entropy", None),
            ("rollout/response_len_mean", "response length (tokens)", "response_len_mean"),
        ]
        names = sorted({k.split("/")[1] for r in evals for k in r if k.startswith("eval/")})
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
        x = [r["rollout_id"] for r in rows]
        for ax, (key, title, eval_key) in zip(axes, panels, strict=True):
            ax.plot(x, [r.get(key, float("nan")) for r in rows], marker=".", linewidth=1, label="train")
            for name in names if eval_key else []:  # evaluated weights after s rollouts: drawn at x = s
                ex = [r["eval_step"] for r in evals if f"eval/{name}/{eval_key}" in r]
                ey = [r[f"eval/{name}/{eval_key}"] for r in evals if f"eval/{name}/{eval_key}" in r]
                ax.plot(ex, ey, marker="o", linewidth=1.5, label=f"eval {name}")
            if names and eval_key:
                ax.legend(fontsize=7)
            ax.set_title(title)
            ax.set_xlabel("rollout")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.run_dir / "plot.png"
        tmp = self.run_dir / ".plot.png.tmp.png"
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        os.replace(tmp, out)
        return out

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self.wandb is not None:
            self.wandb.close()


def console_line(rollout_id: int, num_rollout: int, metrics: dict[str, float], perf: dict[str, float]) -> str:
    """The progress line a user watches: rollout, samples, tokens/s, reward, KL, time per phase."""
    phases = " ".join(
        f"{k.removeprefix('time/')}={v:.2f}s" for k, v in perf.items() if k.startswith("time/") and k != "time/total"
    )
    return (
        f"rollout {rollout_id + 1}/{num_rollout} | samples {int(metrics.get('rollout/samples', 0))} | "
        f"gen {perf.get('rollout/tokens_per_s', 0.0):.0f} tok/s | reward "
        f"{metrics.get('rollout/reward_mean', 0.0):.3f} | "
        f"kl {metrics.get('train/kl_loss', 0.0):.4f} | {phases} | total {perf.get('time/total', 0.0):.2f}s"
    )


def rollout_metrics(
    samples: list[Sample], reward_stats: dict[str, float], step_metrics: list[dict[str, float]], weight_version: int
) -> tuple[dict[str, float], dict[str, float]]:
    """One rollout's figures: ``(metrics, perf)``.

    ``metrics`` are a pure function of the run (they go to ``metrics.jsonl``); any
    figure the reward, the rollout or the actor reported under a :data:`WALL_CLOCK_SUFFIXES`
    name depends on timing, so it moves to ``perf``.
    """
    rewards = [x.reward for x in samples]
    lens = [len(x.response_ids) for x in samples]
    metrics: dict[str, float] = {
        "rollout/samples": float(len(samples)),
        "rollout/reward_mean": statistics.fmean(rewards),
        "rollout/reward_std": statistics.pstdev(rewards),
        "rollout/response_len_mean": statistics.fmean(lens),
        "rollout/truncated_frac": statistics.fmean(1.0 if x.finish_reason == "length" else 0.0 for x in samples),
        "rollout/weight_version": float(weight_version),
    }
    if any(x.turns for x in samples):  # multi-turn rollouts: turns, tools and how much of a response trains
        metrics.update(
            {
                "rollout/turns_mean": statistics.fmean(x.turns for x in samples),
                "rollout/tool_calls_mean": statistics.fmean(x.tool_calls for x in samples),
                "rollout/tool_call_frac": statistics.fmean(1.0 if x.tool_calls else 0.0 for x in samples),
                "rollout/tool_failures": float(sum(x.tool_failures for x in samples)),
                "rollout/tool_timeouts": float(sum(x.tool_timeouts for x in samples)),
                "rollout/trained_tokens_mean": statistics.fmean(sum(x.trained_mask()) for x in samples),
            }
        )
    metrics.update({k: float(v) for k, v in reward_stats.items()})
    for k in sorted({k for m in step_metrics for k in m}):
        metrics[f"train/{k}"] = statistics.fmean(m[k] for m in step_metrics if k in m)
    perf = {k: metrics.pop(k) for k in [k for k in metrics if k.endswith(WALL_CLOCK_SUFFIXES)]}
    return metrics, perf
