"""Relative input paths resolve from the spec file's directory, wherever miles runs, and the copy records them."""

from __future__ import annotations

from pathlib import Path

import pytest

from miles.reward.model import RewardModel
from miles.spec import load_spec, spec_to_toml


def _write(where: Path, text: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    path = where / "run.toml"
    path.write_text(text)
    return path


SPEC = """
[run]
name = "t"
num_rollout = 3
[model]
hf_checkpoint = "models/tiny"
[ckpt]
load = "../ckpts/start"
ref_load = "Org/Model"
[rollout]
prompt_data = "data/train.jsonl"
custom_rm_path = "rewards.py:score"
dynamic_sampling_filter_path = "my_pkg.filters:keep"
rollout_batch_size = 4
n_samples_per_prompt = 2
[eval]
eval_prompt_data = { test = "data/test.jsonl", abs = "/abs/test.jsonl" }
eval_interval = 1
[train]
global_batch_size = 8
"""


def test_inputs_resolve_from_the_spec_directory_not_the_current_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = tmp_path / "exp"
    (exp / "models" / "tiny").mkdir(parents=True)
    path = _write(exp, SPEC)
    monkeypatch.chdir(tmp_path)  # not the spec's directory
    spec = load_spec("exp/run.toml")
    assert spec.rollout.prompt_data == str(exp / "data" / "train.jsonl")
    assert spec.rollout.custom_rm_path == f"{exp / 'rewards.py'}:score"
    assert spec.rollout.dynamic_sampling_filter_path == "my_pkg.filters:keep"  # a module, not a path
    assert spec.eval.eval_prompt_data == {"test": str(exp / "data" / "test.jsonl"), "abs": "/abs/test.jsonl"}
    assert spec.model.hf_checkpoint == str(exp / "models" / "tiny")
    assert spec.ckpt.load == str(tmp_path / "ckpts" / "start")  # ../ : a path, even before it exists
    assert spec.ckpt.ref_load == "Org/Model"  # not a directory beside the spec: kept as written
    assert spec.run.run_dir == "runs/t"  # outputs stay relative to where miles runs
    assert load_spec(path).rollout.prompt_data == spec.rollout.prompt_data  # same from anywhere


def test_set_paths_resolve_from_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "exp", SPEC)
    monkeypatch.chdir(tmp_path)
    spec = load_spec("exp/run.toml", ["rollout.prompt_data=other.jsonl", "eval.eval_prompt_data.test=t.jsonl"])
    assert spec.rollout.prompt_data == str(tmp_path / "other.jsonl")
    assert spec.eval.eval_prompt_data["test"] == str(tmp_path / "t.jsonl")
    assert spec.eval.eval_prompt_data["abs"] == "/abs/test.jsonl"


def test_the_copied_spec_records_absolute_paths_and_finds_the_reward_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `miles submit` writes to RUN_DIR/spec.toml, loaded by a rank from the run directory."""
    exp = tmp_path / "exp"
    _write(exp, SPEC.replace('hf_checkpoint = "models/tiny"', 'builtin = "tiny-arith"'))
    (exp / "rewards.py").write_text("def score(sample):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    copy = _write(tmp_path / "runs" / "t", spec_to_toml(load_spec("exp/run.toml"))).rename(
        tmp_path / "runs" / "t" / "spec.toml"
    )
    monkeypatch.chdir(tmp_path / "runs")
    loaded = load_spec(copy)
    assert loaded.rollout.custom_rm_path == f"{exp / 'rewards.py'}:score"
    assert f'custom_rm_path = "{exp / "rewards.py"}:score"' in copy.read_text()
    reward = RewardModel.from_spec(loaded.rollout, base_dir=copy.parent)
    reward.close()
