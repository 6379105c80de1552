"""Exact resume: a run interrupted anywhere ends with the same metrics and weights as one that never was.

Start here to see the exact-resume promise tested end to end on the CPU. Each case
runs ``miles run`` (two FSDP trainer ranks over gloo, two embedded engines, real
HTTP, real weight sync) on a short quickstart, once straight through and once
interrupted by faults injected through ``MILES_FAULT`` (see ``miles/fault.py``):
a preemption flag between phases, SIGTERM landing mid-rollout and mid-optimizer
step, and SIGKILL in the middle of writing a checkpoint. Each interrupted life is
restarted on the same run directory until the run completes. ``metrics.jsonl``
and the exported final weights must be identical, bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
ROLLOUTS = 6

pytestmark = pytest.mark.slow


MODES = {
    # Each rollout mode's keys over the quickstart; "sync" is the default loop (the cases above).
    "dynamic-sampling": (
        "rollout.over_sampling_batch_size=32",
        'rollout.dynamic_sampling_filter_path="miles.reward.filters:check_reward_nonzero_std"',
    ),
    # one step off: the stop lands while rollout 3 is generated ahead of rollout 2's training
    "train-async": ("run.train_async=true", "grpo.use_tis=true"),
}


def _miles_run(
    run_dir: Path, fault: str = "", timeout: float = 300, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MILES_GRACE_S": "60"}
    env.pop("MILES_FAULT", None)
    if fault:
        env["MILES_FAULT"] = fault
    cmd = [
        sys.executable,
        "-m",
        "miles.cli",
        "run",
        str(ROOT / "configs" / "quickstart.toml"),
        "--set",
        f"run.run_dir={str(run_dir)!r}".replace("'", '"'),
        "--set",
        f"run.num_rollout={ROLLOUTS}",
        "--set",
        "run.use_tensorboard=false",
        "--set",
        "run.plot=false",
        "--set",
        "rollout.rollout_batch_size=16",
        "--set",
        "rollout.n_samples_per_prompt=4",
        "--set",
        "train.global_batch_size=32",
        "--set",
        "train.micro_batch_size=8",
        "--set",
        "ckpt.save_interval=2",
        "--set",
        "ckpt.keep_last=3",
        *(arg for setting in extra for arg in ("--set", setting)),
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _final(run_dir: Path) -> tuple[str, dict[str, object]]:
    metrics = (run_dir / "metrics.jsonl").read_text()
    weights = load_file(str(run_dir / "final" / "model.safetensors"))
    return metrics, weights  # type: ignore[return-value]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, object]]:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    proc = _miles_run(run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run_dir / "control" / "done").exists()
    metrics, weights = _final(run_dir)
    assert len(metrics.splitlines()) == ROLLOUTS
    return metrics, weights


LIVES = {
    # Each list is the sequence of lives: the faults of one life, then the next life's ...
    "between-phases": ["preempt@sync:1", "preempt@generate:3", ""],
    "mid-rollout-and-mid-step": ["term@generate:2", "term@train:3", "term@train:4", ""],
    "kill-mid-save": ["kill@save:4", "kill@save:6", ""],
}


@pytest.mark.parametrize("case", sorted(LIVES))
def test_interrupted_run_matches_the_straight_one(
    case: str, baseline: tuple[str, dict[str, object]], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    for life, fault in enumerate(LIVES[case]):
        proc = _miles_run(run_dir, fault)
        output = proc.stdout + proc.stderr
        last = life == len(LIVES[case]) - 1
        if last:
            assert proc.returncode == 0, output[-4000:]
            assert (run_dir / "control" / "done").exists()
        elif fault.startswith("kill"):
            assert proc.returncode != 0, output[-4000:]  # a crash is a failure; the next life resumes anyway
            assert "injecting fault kill" in output
        else:
            assert proc.returncode == 0, output[-4000:]
            assert "preempted; saved the state" in output, output[-4000:]
            assert not (run_dir / "control" / "done").exists()
    metrics, weights = _final(run_dir)
    base_metrics, base_weights = baseline
    assert metrics == base_metrics
    assert weights.keys() == base_weights.keys()
    for name, tensor in weights.items():
        assert tensor.dtype == base_weights[name].dtype  # type: ignore[attr-defined]
        assert bool((tensor == base_weights[name]).all()), name  # type: ignore[operator]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_interrupted_run_in_each_rollout_mode_matches_the_straight_one(mode: str, tmp_path: Path) -> None:
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    proc = _miles_run(straight, extra=MODES[mode])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    proc = _miles_run(interrupted, "term@generate:2", extra=MODES[mode])  # mid-rollout: it is drawn again
    assert proc.returncode == 0 and "preempted; saved the state" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]
    proc = _miles_run(interrupted, extra=MODES[mode])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    metrics, weights = _final(interrupted)
    base_metrics, base_weights = _final(straight)
    assert metrics == base_metrics and len(metrics.splitlines()) == ROLLOUTS
    for name, tensor in weights.items():
        assert bool((tensor == base_weights[name]).all()), name  # type: ignore[operator]


def test_resume_refuses_a_changed_four_knob(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _miles_run(run_dir, "preempt@sync:0")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MILES_FAULT", None)
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
        "rollout.rollout_batch_size=16",
        "--set",
        "rollout.n_samples_per_prompt=8",
        "--set",
        "train.global_batch_size=32",
        "--set",
        "train.micro_batch_size=8",
        "--set",
        "ckpt.save_interval=2",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rollout.n_samples_per_prompt: checkpoint has 4, spec has 8" in out
