"""``[ckpt] ref_load`` pointing at a Megatron checkpoint is refused naming the fix, before and at run time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from miles.ckpt.reference import megatron_checkpoint_sign
from miles.errors import UserError
from miles.preflight import check
from miles.spec import load_spec
from miles.train.actor import reference_dir

ROOT = Path(__file__).resolve().parents[3]


def _megatron_dirs(tmp_path: Path) -> list[Path]:
    tracker = tmp_path / "tracker"
    (tracker / "iter_0000100").mkdir(parents=True)
    (tracker / "latest_checkpointed_iteration.txt").write_text("100\n")
    torch_dist = tmp_path / "torch_dist"
    torch_dist.mkdir()
    (torch_dist / ".metadata").write_bytes(b"")
    iters = tmp_path / "iters"
    (iters / "iter_0000007").mkdir(parents=True)
    return [tracker, torch_dist, iters]


def test_megatron_checkpoints_are_refused_and_hf_directories_pass(tmp_path: Path) -> None:
    spec = load_spec(ROOT / "configs" / "quickstart.toml")
    for path in _megatron_dirs(tmp_path):
        assert megatron_checkpoint_sign(path) is not None, path
        with_ref = dataclasses.replace(spec, ckpt=dataclasses.replace(spec.ckpt, ref_load=str(path)))
        report = check(with_ref, local_only=True, skip=("data", "code", "resume"))
        assert any("is a Megatron checkpoint" in str(p) and "leave ref_load empty" in str(p) for p in report.problems)
        with pytest.raises(UserError, match=r"\[ckpt\] ref_load: .* is a Megatron checkpoint"):
            reference_dir(with_ref.ckpt.ref_load, "/initial")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert megatron_checkpoint_sign(hf) is None
    assert reference_dir(str(hf), "/initial") == str(hf)
    assert reference_dir(spec.ckpt.ref_load, "/initial") == "/initial"
