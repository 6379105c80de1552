"""W&B logging in a real run: ``miles run`` with ``[run] use_wandb``, preempted, requeued, and ended.

The CPU quickstart with evaluation, cut small (one trainer rank, one engine, three rollouts), runs with the
real ``wandb`` package in its default offline mode. SIGTERM lands in the second rollout (as a Slurm
preemption does); the second life resumes the same run directory. Both lives must log to the one W&B run
whose id the run directory keeps, and what the two offline folders hold, read back from W&B's own
transaction logs, must be ``metrics.jsonl`` and ``perf.jsonl``: every figure drawn against its rollout's
``rollout_id`` or its evaluation's ``eval_step``, the later life's where it redid a rollout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.unit.session.wandb_records import read_offline_run

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

SETTINGS = (
    "run.num_rollout=3",
    "run.use_tensorboard=false",
    "run.plot=false",
    "run.use_wandb=true",
    'run.wandb_project="miles-tests"',
    'run.wandb_group="resume"',
    'run.wandb_tags=["cpu"]',
    "cluster.actor_num_gpus_per_node=1",
    "rollout.rollout_batch_size=8",
    "rollout.n_samples_per_prompt=4",
    "train.global_batch_size=32",
    "train.micro_batch_size=32",
    "eval.eval_interval=2",
    "eval.n_samples_per_eval_prompt=1",
)


def _miles_run(run_dir: Path, fault: str = "") -> subprocess.CompletedProcess[str]:
    pytest.importorskip("wandb")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MILES_GRACE_S": "60"}  # W&B's own files: tests/unit/conftest.py
    env.pop("MILES_FAULT", None)
    env.pop("WANDB_MODE", None)  # the spec's wandb_mode (offline by default) decides
    if fault:
        env["MILES_FAULT"] = fault
    cmd = [sys.executable, "-m", "miles.cli", "run", str(ROOT / "configs" / "quickstart-eval.toml")]
    for setting in (f'run.run_dir="{run_dir}"', *SETTINGS):
        cmd += ["--set", setting]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_preempted_run_logs_both_lives_to_one_wandb_run_as_its_metrics_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = _miles_run(run_dir, "term@generate:1")
    assert first.returncode == 0 and "preempted; saved the state" in first.stdout, (first.stdout + first.stderr)[-4000:]
    second = _miles_run(run_dir)
    assert second.returncode == 0 and (run_dir / "control" / "done").exists(), (second.stdout + second.stderr)[-4000:]

    wandb_id = (run_dir / "wandb-run-id").read_text().strip()
    sync = f"wandb sync {run_dir / 'wandb'}/offline-run-*-{wandb_id}"
    assert sync in first.stdout and sync in second.stdout  # each life ends with the command that uploads both
    lives = [read_offline_run(folder) for folder in sorted((run_dir / "wandb").glob("offline-run-*"))]
    assert [life.id for life in lives] == [wandb_id, wandb_id]
    for life in lives:
        assert (life.project, life.group, life.name, life.tags) == ("miles-tests", "resume", "quickstart-eval", ["cpu"])
        assert life.config["rollout"]["rollout_batch_size"] == 8 and life.config["run"]["use_wandb"] is True

    logged: dict[tuple[str, int], dict[str, Any]] = {}
    for life in lives:  # the later life's figures replace those of a rollout it redid
        for row in life.history:
            figures = {k: v for k, v in row.items() if not k.startswith("_")}
            axis = "rollout_id" if "rollout_id" in figures else "eval_step"
            assert all(life.axes[k] == axis for k in figures if k != axis)
            logged.setdefault((axis, figures.pop(axis)), {}).update(figures)
    files: dict[tuple[str, int], dict[str, Any]] = {}
    for row in _rows(run_dir / "metrics.jsonl") + _rows(run_dir / "perf.jsonl"):
        axis = "rollout_id" if "rollout_id" in row else "eval_step"
        files.setdefault((axis, row.pop(axis)), {}).update(row)
    assert sorted(files) == [("eval_step", s) for s in (0, 2, 3)] + [("rollout_id", r) for r in range(3)]
    assert logged == files
