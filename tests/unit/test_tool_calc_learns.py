"""The multi-turn CPU example learns to use its tool: `miles run configs/tool-calc.toml`, shortened.

One FSDP trainer rank and one embedded engine; the built-in turn-synchronous
rollout function drives two-turn conversations (call, tool answer with loss mask 0,
answer). Without the calculator a random digit is right 1 time in 10; the run is
deterministic (fixed seeds, batched requests), so these figures are what the code
computes: the tool-call share climbs from about 5% and the reward with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLLOUTS = 8

pytestmark = pytest.mark.slow


def test_the_model_learns_to_call_the_calculator(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "miles.cli",
        "run",
        str(ROOT / "configs" / "tool-calc.toml"),
        "--set",
        f'run.run_dir="{run_dir}"',
        "--set",
        f"run.num_rollout={ROLLOUTS}",
        "--set",
        "run.plot=false",
        "--set",
        "run.use_tensorboard=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MILES_FAULT", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout_id"] for r in rows] == list(range(ROLLOUTS))
    calls = [r["rollout/tool_call_frac"] for r in rows]
    rewards = [r["rollout/reward_mean"] for r in rows]
    assert calls[0] < 0.1 and calls[-1] > 0.3, calls  # the model learned to call the tool
    assert rewards[0] < 0.08 and rewards[-1] > rewards[0] + 0.1, rewards  # and to read its answer
    # Every sample of a conversation that called the tool trained fewer tokens than it has (the answer is masked).
    assert all(r["rollout/trained_tokens_mean"] < r["rollout/response_len_mean"] for r in rows[1:])
    assert all(r["rollout/turns_mean"] >= 1.0 for r in rows)
