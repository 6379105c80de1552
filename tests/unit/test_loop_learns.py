"""The quickstart learns: `miles run` with two FSDP trainer ranks (gloo) and two embedded engines.

A fixed seed makes the run deterministic, so the figures below are what this
code computes, not luck: the mean reward of a random tiny model is about 0.05
and after 20 rollouts of GRPO it is several times higher. With
``check_weight_sync`` the driver compares every engine's weight checksums with
the actor's after each sync and stops the run on any difference.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLLOUTS = 20

pytestmark = pytest.mark.slow


def test_quickstart_reward_rises_and_engines_hold_the_actors_weights(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "miles.cli",
        "run",
        str(ROOT / "configs" / "quickstart.toml"),
        "--set",
        f'run.run_dir="{run_dir}"',
        "--set",
        f"run.num_rollout={ROLLOUTS}",
        "--set",
        "rollout.check_weight_sync=true",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MILES_FAULT", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("weight sync verified") == ROLLOUTS, out[-4000:]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout_id"] for r in rows] == list(range(ROLLOUTS))
    rewards = [r["rollout/reward_mean"] for r in rows]
    first, last = statistics.fmean(rewards[:3]), statistics.fmean(rewards[-3:])
    assert first <= 0.2, rewards
    assert last >= first + 0.15, rewards
    assert all(r["rollout/samples"] == 512 for r in rows)
    # What the user sees: progress lines, the plot, TensorBoard events, the final model.
    assert f"rollout {ROLLOUTS}/{ROLLOUTS}" in out and "tok/s" in out
    assert (run_dir / "plot.png").stat().st_size > 5000
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "final" / "model.safetensors").exists()
