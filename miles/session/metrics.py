"""What a run reports: metrics.jsonl, TensorBoard events, a PNG plot and a console line.

Two streams, kept apart on purpose:

* ``metrics.jsonl``: one line per rollout of quantities that are a pure function of
  the run (reward, KL, entropy, lengths, losses). A run interrupted and resumed
  writes the same file bit for bit as one that never was, which is how exact resume
  is tested.
* ``perf.jsonl``: wall-clock figures (seconds per phase, tokens/s). They differ
  between any two runs and never enter ``metrics.jsonl``.

On resume, lines of rollouts at or after the resume point are dropped first, so a
rollout that ran after the last checkpoint and was lost is not counted twice.
Only the driver (trainer rank 0) writes.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from miles.sample import Sample

WALL_CLOCK_SUFFIXES = ("time_s", "_timing")
"""Names of figures that depend on timing (seconds; how many surplus samples an abort caught mid-flight)."""


def _truncate_jsonl(path: Path, start_rollout: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["rollout_id"] < start_rollout:
                keep.append(line)
        except (ValueError, KeyError):
            break  # a torn last line from a kill: drop it and everything after
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)


class MetricsLog:
    """Writes a run's metrics; create one on the driver only."""

    def __init__(self, run_dir: Path, start_rollout: int, tensorboard: bool, plot: bool) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.perf_path = run_dir / "perf.jsonl"
        for p in (self.metrics_path, self.perf_path):
            _truncate_jsonl(p, start_rollout)
        self.plot_enabled = plot
        self._tb: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_rollout)

    def log(self, rollout_id: int, metrics: dict[str, float], perf: dict[str, float]) -> None:
        """Append one rollout's metrics and perf figures, then refresh the plot."""
        for path, values in ((self.metrics_path, metrics), (self.perf_path, perf)):
            with path.open("a") as f:
                f.write(json.dumps({"rollout_id": rollout_id, **values}, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if self._tb is not None:
            for k, v in {**metrics, **perf}.items():
                self._tb.add_scalar(k, v, rollout_id)
            self._tb.flush()
        if self.plot_enabled:
            self.plot()

    def plot(self) -> Path:
        """Draw reward, KL, entropy and response length per rollout into ``plot.png``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]
        panels = [
            ("rollout/reward_mean", "mean reward"),
            ("train/kl_loss", "KL to reference"),
            ("train/entropy", "entropy"),
            ("rollout/response_len_mean", "response length (tokens)"),
        ]
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
        x = [r["rollout_id"] for r in rows]
        for ax, (key, title) in zip(axes, panels, strict=True):
            ax.plot(x, [r.get(key, float("nan")) for r in rows], marker=".", linewidth=1)
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
    metrics.update({k: float(v) for k, v in reward_stats.items()})
    for k in sorted({k for m in step_metrics for k in m}):
        metrics[f"train/{k}"] = statistics.fmean(m[k] for m in step_metrics if k in m)
    perf = {k: metrics.pop(k) for k in [k for k in metrics if k.endswith(WALL_CLOCK_SUFFIXES)]}
    return metrics, perf
