"""Fixtures of the pre-flight tests: a workspace that is the current directory, with recording Slurm tools on PATH."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.preflight.workspace import Workspace


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    root = tmp_path / "ws"
    root.mkdir()
    workspace = Workspace(root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("PATH", workspace.env_path())
    monkeypatch.setattr("sys.dont_write_bytecode", True)
    return workspace
