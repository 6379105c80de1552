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
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
ROLLOUTS = 6

pytestmark = pytest.mark.slow


QUICKSTART = [
    "rollout.rollout_batch_size=16",
    "rollout.n_samples_per_prompt=4",
    "train.global_batch_size=32",
    "train.micro_batch_size=8",
]
TOOL_CALC = [  # multi-turn: tool calls, appended tool answers with loss mask 0, one trainer rank; the per-sample
    # generate function (each turn its own request) rather than the example's batched rollout function
    'rollout.rollout_function_path=""',
    'rollout.custom_generate_function_path="miles.rollout.multi_turn:generate"',
    "rollout.rollout_batch_size=8",
    "rollout.n_samples_per_prompt=4",
    "train.global_batch_size=32",
    "train.micro_batch_size=32",
]
CONFIGS = {"quickstart": ("quickstart.toml", QUICKSTART), "tool-calc": ("tool-calc.toml", TOOL_CALC)}


def _miles_run(
    run_dir: Path, fault: str = "", timeout: float = 300, config: str = "quickstart"
) -> subprocess.CompletedProcess[str]:
    toml, sets = CONFIGS[config]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MILES_GRACE_S": "60"}
    env.pop("MILES_FAULT", None)
    if fault:
        env["MILES_FAULT"] = fault
    cmd = [
        sys.executable,
        "-m",
        "miles.cli",
        "run",
        str(ROOT / "configs" / toml),
        "--set",
        f"run.run_dir={str(run_dir)!r}".replace("'", '"'),
        "--set",
        f"run.num_rollout={ROLLOUTS}",
        "--set",
        "run.use_tensorboard=false",
        "--set",
        "run.plot=false",
        "--set",
        "ckpt.save_interval=2",
        "--set",
        "ckpt.keep_last=3",
    ]
    for item in sets:
        cmd += ["--set", item]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _final(run_dir: Path) -> tuple[str, dict[str, object]]:
    metrics = (run_dir / "metrics.jsonl").read_text()
    weights = load_file(str(run_dir / "final" / "model.safetensors"))
    return metrics, weights  # type: ignore[return-value]


Baseline = tuple[str, dict[str, object]]


@pytest.fixture(scope="module")
def baselines(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Baseline]:
    """The straight run of each config, made once per module on first use."""
    made: dict[str, Baseline] = {}

    def get(config: str) -> Baseline:
        if config not in made:
            run_dir = tmp_path_factory.mktemp(f"straight-{config}") / "run"
            proc = _miles_run(run_dir, config=config)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            assert (run_dir / "control" / "done").exists()
            metrics, weights = _final(run_dir)
            assert len(metrics.splitlines()) == ROLLOUTS
            made[config] = metrics, weights
        return made[config]

    return get


LIVES = {
    # Each list is the sequence of lives: the faults of one life, then the next life's ...
    "between-phases": ["preempt@sync:1", "preempt@generate:3", ""],
    "mid-rollout-and-mid-step": ["term@generate:2", "term@train:3", "term@train:4", ""],
    "kill-mid-save": ["kill@save:4", "kill@save:6", ""],
    "tool-calc:mid-rollout": ["term@generate:2", ""],
}


@pytest.mark.parametrize("case", sorted(LIVES))
def test_interrupted_run_matches_the_straight_one(
    case: str, baselines: Callable[[str], Baseline], tmp_path: Path
) -> None:
    config = case.split(":")[0] if ":" in case else "quickstart"
    run_dir = tmp_path / "run"
    for life, fault in enumerate(LIVES[case]):
        proc = _miles_run(run_dir, fault, config=config)
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
    base_metrics, base_weights = baselines(config)
    assert metrics == base_metrics
    assert weights.keys() == base_weights.keys()
    for name, tensor in weights.items():
        assert tensor.dtype == base_weights[name].dtype  # type: ignore[attr-defined]
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
