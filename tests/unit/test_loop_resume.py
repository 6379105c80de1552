"""Exact resume: a run interrupted anywhere ends with the same metrics and weights as one that never was.

Start here to see the exact-resume promise tested end to end on the CPU. Each case
runs ``miles run`` (two FSDP trainer ranks over gloo, two embedded engines, real
HTTP, real weight sync) on a short quickstart with dynamic sampling, once straight
through and once interrupted by faults injected through ``MILES_FAULT`` (see
``miles/fault.py``): a preemption flag between phases, SIGTERM landing mid-rollout
and mid-optimizer step, and SIGKILL in the middle of writing a checkpoint. Each
interrupted life is restarted on the same run directory until the run completes.
``metrics.jsonl`` and the exported final weights must be identical, bit for bit.
A multi-turn tool-calling run generated one step off (``train_async``) is held to
the same promise.

The runs evaluate a held-back dataset (``configs/quickstart-eval.toml``) before
training and every two rollouts, so the identical ``metrics.jsonl`` also says a
resumed run neither skips nor repeats an evaluation; and the same run without
evaluation trains bit-identically (evaluation never moves training's data order,
seeds or weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from miles.rollout.partial import CUT_ENV

ROOT = Path(__file__).resolve().parents[2]
ROLLOUTS = 6

pytestmark = pytest.mark.slow


EVALS = [0, 2, 4, 6]
"""The steps evaluated: before training, every ``eval_interval = 2`` rollouts, and the last."""

QUICKSTART = (
    "rollout.rollout_batch_size=16",
    "rollout.n_samples_per_prompt=4",
    "train.global_batch_size=32",
    "train.micro_batch_size=8",
    'train.qkv_format="thd"',  # packed micro-batches through every fault
    # dynamic sampling: rounds of 32 prompts until 16 groups pass the filter, the surplus aborted
    "rollout.over_sampling_batch_size=32",
    'rollout.dynamic_sampling_filter_path="miles.reward.filters:check_reward_nonzero_std"',
)
TOOL_CALC_ASYNC = (
    # multi-turn: tool calls, appended tool answers with loss mask 0, one trainer rank; the per-sample generate
    # function (each turn its own request) rather than the example's batched rollout function
    'rollout.rollout_function_path=""',
    'rollout.custom_generate_function_path="miles.rollout.multi_turn:generate"',
    "rollout.rollout_batch_size=8",
    "rollout.n_samples_per_prompt=4",
    "train.global_batch_size=32",
    "train.micro_batch_size=32",
    # one step off: the stop lands while rollout 3 is generated ahead of rollout 2's training, so the checkpoint
    # carries a rollout generated and not yet trained on
    "run.train_async=true",
    "grpo.use_tis=true",
)


PARTIAL = (
    *QUICKSTART,
    # the surplus of each rollout carried over and continued first in the next, only its on-policy tail trained
    "rollout.partial_rollout=true",
    "rollout.mask_offpolicy_in_partial_rollout=true",
    # responses of up to 6 tokens, scored by length (the filter keeps the groups of unequal lengths)
    "rollout.rollout_max_response_len=6",
    'rollout.rm_type=""',
    f'rollout.custom_rm_path="{ROOT}/tests/unit/spec/key_effect_rewards.py:score"',
)
PARTIAL_ENV = {CUT_ENV: "2"}
"""The test setting that makes a partial rollout a function of the seeds: the surplus cut at 2 tokens, not aborted."""


def _miles_run(
    run_dir: Path,
    fault: str = "",
    timeout: float = 300,
    config: str = "quickstart-eval.toml",
    sets: tuple[str, ...] = QUICKSTART,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MILES_GRACE_S": "60", **(extra_env or {})}
    env.pop("MILES_FAULT", None)
    if fault:
        env["MILES_FAULT"] = fault
    cmd = [sys.executable, "-m", "miles.cli", "run", str(ROOT / "configs" / config)]
    common = (
        f"run.run_dir={str(run_dir)!r}".replace("'", '"'),
        f"run.num_rollout={ROLLOUTS}",
        "run.use_tensorboard=false",
        "run.plot=false",
        "ckpt.save_interval=2",
        "ckpt.keep_last=3",
    )
    for setting in (*common, *sets):
        cmd += ["--set", setting]
    if config == "quickstart-eval.toml":
        cmd += ["--set", "eval.eval_interval=2", "--set", "eval.n_samples_per_eval_prompt=2"]
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
    rows = [json.loads(line) for line in metrics.splitlines()]
    assert [r["rollout_id"] for r in rows if "rollout_id" in r] == list(range(ROLLOUTS))
    assert [r["eval_step"] for r in rows if "eval_step" in r] == EVALS
    assert all(r["eval/majority/prompts"] == 256 for r in rows if "eval_step" in r)
    trained = [r for r in rows if "rollout_id" in r]
    # over_sampling_batch_size: rounds of 32 prompts, 16 groups kept; dynamic_sampling_filter_path: groups dropped
    assert all(r["rollout/prompts_used"] >= 16 and r["rollout/groups_kept"] == 16 for r in trained)
    assert sum(r["rollout/groups_dropped"] for r in trained) > 0
    return metrics, weights


def test_evaluation_leaves_training_bit_identical(baseline: tuple[str, dict[str, object]], tmp_path: Path) -> None:
    """The same run without [eval]: the same training metrics, line for line, and the same final weights.

    Then ``miles eval`` of that run's initial model (one engine, the seeds of the loop's evaluation before
    training) repeats the evaluated run's step-0 figures exactly, and writes them as JSON.
    """
    run_dir = tmp_path / "run"
    proc = _miles_run(run_dir, config="quickstart.toml")  # the same run, dynamic sampling included
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    metrics, weights = _final(run_dir)
    base_metrics, base_weights = baseline
    trained = [line for line in base_metrics.splitlines() if '"eval_step"' not in line]
    assert metrics.splitlines() == trained
    assert weights.keys() == base_weights.keys()
    for name, tensor in weights.items():
        assert bool((tensor == base_weights[name]).all()), name  # type: ignore[operator]

    out = tmp_path / "initial.json"
    cmd = [sys.executable, "-m", "miles.cli", "eval", str(ROOT / "configs" / "quickstart-eval.toml")]
    cmd += ["--model", str(run_dir / "model"), "--out", str(out), "--set", "eval.n_samples_per_eval_prompt=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "majority" in proc.stdout and "pass@2" in proc.stdout
    step0 = next(json.loads(line) for line in base_metrics.splitlines() if '"eval_step": 0' in line)
    assert json.loads(out.read_text())["metrics"] == {k: v for k, v in step0.items() if k != "eval_step"}


LIVES = [
    # The faults of each life, in turn; every life resumes the run directory the previous one left.
    "preempt@sync:1",  # a preemption flag between phases: saved before rollout 2
    "term@generate:2",  # SIGTERM mid-rollout: saved before rollout 2 again, which is drawn again
    "kill@save:4",  # SIGKILL while a checkpoint is written: the next life starts from the one before rollout 2
    "term@train:3",  # SIGTERM mid-optimizer step: the step ends, then the save before rollout 4
    "kill@save:6",  # SIGKILL while the final checkpoint is written
    "",
]


def test_interrupted_run_matches_the_straight_one(baseline: tuple[str, dict[str, object]], tmp_path: Path) -> None:
    """Six lives, each stopped by a different fault, end with the straight run's metrics and weights.

    Between two lives, a resume with a changed four-knob value is refused and leaves the run as it was."""
    run_dir = tmp_path / "run"
    for life, fault in enumerate(LIVES):
        proc = _miles_run(run_dir, fault)
        output = proc.stdout + proc.stderr
        if life == len(LIVES) - 1:
            assert proc.returncode == 0, output[-4000:]
            assert (run_dir / "control" / "done").exists()
        elif fault.startswith("kill"):
            assert proc.returncode != 0, output[-4000:]  # a crash is a failure; the next life resumes anyway
            assert "injecting fault kill" in output
        else:
            assert proc.returncode == 0, output[-4000:]
            assert "preempted; saved the state" in output, output[-4000:]
            assert not (run_dir / "control" / "done").exists()
        if life == 0:
            _refuses_a_changed_four_knob(run_dir)
    metrics, weights = _final(run_dir)
    base_metrics, base_weights = baseline
    assert metrics == base_metrics
    assert weights.keys() == base_weights.keys()
    for name, tensor in weights.items():
        assert tensor.dtype == base_weights[name].dtype  # type: ignore[attr-defined]
        assert bool((tensor == base_weights[name]).all()), name  # type: ignore[operator]


def test_interrupted_multi_turn_async_run_matches_the_straight_one(tmp_path: Path) -> None:
    """Tool-using conversations generated one step off: a stop mid-rollout resumes to the straight run's end."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run = {"config": "tool-calc.toml", "sets": TOOL_CALC_ASYNC}
    proc = _miles_run(straight, **run)  # type: ignore[arg-type]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    proc = _miles_run(interrupted, "term@generate:2", **run)  # type: ignore[arg-type]
    assert proc.returncode == 0 and "preempted; saved the state" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]
    proc = _miles_run(interrupted, **run)  # type: ignore[arg-type]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    metrics, weights = _final(interrupted)
    base_metrics, base_weights = _final(straight)
    assert metrics == base_metrics and len(metrics.splitlines()) == ROLLOUTS
    rows = [json.loads(line) for line in metrics.splitlines()]
    # train_async: every rollout after the first was generated by weights one version behind the actor
    assert [r["rollout/staleness_max"] for r in rows] == [0.0] + [1.0] * (ROLLOUTS - 1)
    assert sum(r["rollout/tool_calls_mean"] for r in rows) > 0  # the conversations did call the tool
    assert all(r["rollout/turns_mean"] >= 1.0 for r in rows)
    for name, tensor in weights.items():
        assert bool((tensor == base_weights[name]).all()), name  # type: ignore[operator]


@pytest.mark.parametrize("train_async", [False, True], ids=["sync", "async"])
def test_interrupted_partial_rollout_run_matches_the_straight_one(tmp_path: Path, train_async: bool) -> None:
    """Partial rollouts: the carried-over groups are in the checkpoint, so a run stopped after a sync and again in
    the middle of generating resumes to the straight run's metrics and weights, no group lost or repeated. One step
    off (``train_async``), the checkpoint also holds the rollout generated ahead, which took from the buffer."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    sets = (*PARTIAL, "run.train_async=true") if train_async else PARTIAL
    run = {"config": "quickstart.toml", "sets": sets, "extra_env": PARTIAL_ENV}
    proc = _miles_run(straight, **run)  # type: ignore[arg-type]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for fault in ("preempt@sync:1", "term@generate:3"):  # saved before rollout 2 (after a sync), then 3 (mid-rollout)
        proc = _miles_run(interrupted, fault, **run)  # type: ignore[arg-type]
        assert proc.returncode == 0 and "preempted; saved the state" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]
    assert (interrupted / "checkpoints").exists()
    proc = _miles_run(interrupted, **run)  # type: ignore[arg-type]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    metrics, weights = _final(interrupted)
    base_metrics, base_weights = _final(straight)
    assert metrics == base_metrics and len(metrics.splitlines()) == ROLLOUTS
    rows = [json.loads(line) for line in metrics.splitlines()]
    # every rollout carried surplus groups over, and every one after the first continued some, off-policy in part
    assert all(r["rollout/partial_groups_carried"] > 0 for r in rows)
    assert rows[0]["rollout/partial_samples_continued"] == 0.0
    assert all(r["rollout/partial_samples_continued"] > 0 for r in rows[1:])
    assert any(r["rollout/partial_offpolicy_token_frac"] > 0 and r["rollout/partial_staleness_max"] == 1 for r in rows)
    for name, tensor in weights.items():
        assert bool((tensor == base_weights[name]).all()), name  # type: ignore[operator]


def _refuses_a_changed_four_knob(run_dir: Path) -> None:
    """A resume with another n_samples_per_prompt is refused before it starts, naming both values."""
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MILES_FAULT", None)
    cmd = [
        sys.executable,
        "-m",
        "miles.cli",
        "run",
        str(ROOT / "configs" / "quickstart-eval.toml"),
        "--set",
        f'run.run_dir="{run_dir}"',
        "--set",
        f"run.num_rollout={ROLLOUTS}",
        "--set",
        "ckpt.save_interval=2",
    ]
    for setting in QUICKSTART:
        cmd += ["--set", setting.replace("n_samples_per_prompt=4", "n_samples_per_prompt=8")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rollout.n_samples_per_prompt: checkpoint has 4, spec has 8" in out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
