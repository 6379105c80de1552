"""``miles submit`` without a cluster: dry run, and a host without Slurm's tools."""

from __future__ import annotations

from pathlib import Path

import pytest

from miles.errors import UserError
from miles.launch import lifecycle, submission
from miles.spec import load_spec

SPEC = """
[run]
name = "sub"
num_rollout = 1
[model]
builtin = "tiny-arith"
dtype = "float32"
[rollout]
prompt_data = "p.jsonl"
input_key = "prompt"
rm_type = "exact_match"
rollout_batch_size = 4
n_samples_per_prompt = 2
[train]
global_batch_size = 8
[perf]
backend = "fsdp"
[cluster]
mode = "split"
gpus_per_node = 4
rollout_num_nodes = 1
rollout_num_gpus = 1
actor_num_nodes = 2
actor_num_gpus_per_node = 1
"""


@pytest.fixture()
def spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1=", "label": "2"}\n')
    (tmp_path / "run.toml").write_text(SPEC)
    return load_spec("run.toml", [])


def test_dry_run_prints_the_het_script_and_writes_nothing(
    spec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert submission.submit(spec, dry_run=True) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and "#SBATCH hetjob" in out and "--het-group=1" in out
    assert "miles.launch.task" in out and not (tmp_path / "runs").exists()


def test_no_slurm_tools_is_a_clear_error_and_leaves_nothing(
    spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(UserError, match="`scontrol` is not installed on this host"):
        submission.submit(spec)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(UserError, match="is this a miles run directory"):
        lifecycle.status(str(tmp_path / "nowhere"))
