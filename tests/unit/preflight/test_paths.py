"""Which spec paths this machine can check: present, of the compute nodes, or missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from miles.preflight.paths import look


def test_look(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here.jsonl").write_text("{}\n")
    assert look("here.jsonl", local_only=False).kind == "here"
    assert look(str(tmp_path / "here.jsonl"), local_only=True).kind == "here"
    missing = look(str(tmp_path / "sub" / "x.jsonl"), local_only=False)
    assert missing.kind == "missing" and f"the nearest existing directory is {tmp_path}" in missing.why
    assert look("rel/x.jsonl", local_only=False).kind == "missing"  # relative: under the start directory
    elsewhere = look("/no-such-top-dir-xyz/data/x.jsonl", local_only=False)
    assert elsewhere.kind == "elsewhere" and "/no-such-top-dir-xyz does not exist on this machine" in elsewhere.why
    assert look("/no-such-top-dir-xyz/data/x.jsonl", local_only=True).kind == "missing"  # miles run: here or nowhere
