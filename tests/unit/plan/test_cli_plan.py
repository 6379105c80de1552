"""`miles validate`, `miles plan` (table and --json) on the example specs, through the real CLI entry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from miles.cli import main
from miles.plan import from_json, golden

CONFIGS = {p.stem: p for p in golden.config_paths()}


def test_validate_prints_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(CONFIGS["split-16node-qwen3-moe"])]) == 0
    out = capsys.readouterr().out
    assert out.startswith("valid: ") and "EP8 ETP1" in out and "16 sglang engine(s)" in out


def test_validate_refuses_bad_layout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(CONFIGS["split-2node-qwen3-8b"]), "--set", "perf.tp=3"]) == 2
    err = capsys.readouterr().err
    assert "perf.tp x perf.pp x perf.cp = 3" in err and "Fix:" in err


def test_plan_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(CONFIGS["split-2node-qwen3-8b"]), "--job-id", "1000"]) == 0
    out = capsys.readouterr().out
    for needle in (
        "Slurm components",
        "Trainer mesh",
        "Trainer ranks",
        "Engines (4 x TP2",
        "Ports (job id 1000)",
        "Weight-update groups",
    ):
        assert needle in out


def test_plan_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(CONFIGS["colocate-1node-qwen2.5-1.5b"]), "--json", "--job-id", "5"]) == 0
    text = capsys.readouterr().out
    data = json.loads(text)
    assert data["mode"] == "colocate" and data["ports"]["job_id"] == 5 and len(data["trainer_ranks"]) == 8
    assert from_json(text).ports.master == data["ports"]["master"]


def test_plan_path_runs_without_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from miles.cli import main\n"
        f"assert main(['plan', {str(CONFIGS['split-16node-qwen3-moe'])!r}]) == 0\n"
        f"assert main(['validate', {str(CONFIGS['colocate-1node-qwen2.5-1.5b'])!r}]) == 0\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_validate_and_plan_explain_what_over_sampling_generates(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        str(CONFIGS["quickstart"]),
        "--set",
        "rollout.over_sampling_batch_size=96",
        "--set",
        'rollout.dynamic_sampling_filter_path="miles.reward.filters:check_reward_nonzero_std"',
    ]
    assert main(["validate", *argv]) == 0
    out = capsys.readouterr().out
    assert "batch 64 prompts x 8 samples = 512 = 512 per step x 1 step(s)" in out  # what training consumes
    assert "rounds of 96 prompts x 8 samples = 768 generations and trains on the first 64 groups" in out
    assert main(["plan", *argv]) == 0
    assert "rounds of 96 prompts" in capsys.readouterr().out
    partial = [
        *argv,
        "--set",
        "rollout.partial_rollout=true",
        "--set",
        "rollout.mask_offpolicy_in_partial_rollout=true",
    ]
    assert main(["validate", *partial]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "aborted and kept with their tokens so far; the next rollout continues those groups first" in out
    assert "only the on-policy tail trained" in out
