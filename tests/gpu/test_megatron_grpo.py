"""GRPO with the Megatron backend on 2 GPUs: ``miles run configs/gpu-megatron-2gpu.toml``.

The whole loop as a user runs it: two trainer ranks (Megatron-core, TP=2, and
again with CP=2 instead, NCCL) and two embedded engines colocated on the same two GPUs, the actor's
memory offloaded while the engines generate, the actor's HF-named weights
pushed to both engines after every rollout and compared with the engines'
checksums (``check_weight_sync``). The reward of the quickstart task starts
near 0.05 and must rise. Skipped without 2 CUDA GPUs.

:func:`check_run` holds the assertions, so a script can apply them to a run it
made itself; ``MILES_GPU_ROLLOUTS`` shortens or lengthens the run (default:
the spec's 30).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "configs" / "gpu-megatron-2gpu.toml"


def _gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA GPUs (Megatron TP=2, 2 engines)")]


def run_spec(run_dir: Path, rollouts: int, extra: Sequence[str] = (), timeout_s: float = 540) -> str:
    """``miles run`` the GPU spec into ``run_dir``; returns the combined output (asserts exit code 0)."""
    cmd = [
        sys.executable,
        "-m",
        "miles.cli",
        "run",
        str(SPEC),
        "--set",
        f'run.run_dir="{run_dir}"',
        "--set",
        f"run.num_rollout={rollouts}",
        *extra,
    ]
    env = {**os.environ, "MILES_GRACE_S": "5"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def check_run(run_dir: Path, output: str, rollouts: int, mesh: dict[str, int] | None = None) -> list[float]:
    """The run's claims: every rollout logged, every sync verified on both engines, the reward rising, and the
    plan's trainer mesh as asked (``mesh``: expected values of ``plan.json``'s mesh keys, default TP=2).

    Returns the mean reward of each rollout.
    """
    verified = [line for line in output.splitlines() if "weight sync verified" in line]
    assert len(verified) == rollouts, output[-6000:]
    assert all("on 2 engines" in line for line in verified), verified[:3]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout_id"] for r in rows] == list(range(rollouts))
    assert all(r["rollout/samples"] == 512 and r["rollout/weight_version"] == r["rollout_id"] + 1 for r in rows)
    rewards = [float(r["rollout/reward_mean"]) for r in rows]
    k = min(3, max(1, rollouts // 4))
    first, last = statistics.fmean(rewards[:k]), statistics.fmean(rewards[-k:])
    assert first <= 0.2, rewards
    assert last >= first + (0.15 if rollouts >= 20 else 0.03), rewards
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["mesh"]["backend"] == "megatron" and plan["device"] == "gpu"
    for key, value in (mesh or {"tp": 2}).items():
        assert plan["mesh"][key] == value, (key, plan["mesh"])
    assert (run_dir / "final" / "model.safetensors").exists()
    return rewards


CP2 = ("--set", "perf.tp=1", "--set", "perf.cp=2", "--set", 'perf.attention_backend="sdpa"')
"""The same run with context parallelism instead of TP: each trainer holds half of every sequence."""


@pytest.mark.parametrize(("extra", "mesh"), [((), {"tp": 2, "cp": 1}), (CP2, {"tp": 1, "cp": 2})], ids=["tp2", "cp2"])
def test_megatron_grpo_on_two_gpus_reward_rises_and_engines_hold_the_actors_weights(
    tmp_path: Path, extra: tuple[str, ...], mesh: dict[str, int]
) -> None:
    rollouts = int(os.environ.get("MILES_GPU_ROLLOUTS", "30"))
    run_dir = tmp_path / "run"
    out = run_spec(run_dir, rollouts, extra)
    check_run(run_dir, out, rollouts, mesh)
