"""The layering of docs/architecture.md is enforced by import-linter, and the checker really bites.

``lint-imports`` runs in the test command on the package itself. These tests run
the same contracts (read from pyproject.toml) on a copy of the package with one
deliberate upward or cyclic import added, and check that the copy is refused
with the offending import named: a contract that could never fail would prove
nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed in this environment")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "tree"
    shutil.copytree(ROOT / "miles", dst / "miles", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_the_package_keeps_its_contracts() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_an_upward_import_is_refused(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    with open(tree / "miles" / "spec" / "tables.py", "a") as f:  # the bottom layer reaching up to the loop
        f.write("\n\ndef _upward() -> None:\n    import miles.loop  # noqa: F401\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "miles.spec is not allowed to import miles.loop" in result.stdout
    assert "miles.spec.tables -> miles.loop" in result.stdout


def test_a_cycle_between_siblings_is_refused(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    with open(tree / "miles" / "train" / "actor.py", "a") as f:  # the protocol importing its implementation
        f.write("\n\ndef _cycle() -> None:\n    import miles.train.fsdp  # noqa: F401\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "No cycles are allowed in miles.train" in result.stdout


def test_every_package_has_a_layer() -> None:
    """A new package or top-level module must be placed in the layers, or it would escape the contract."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (layers,) = [c["layers"] for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    package = ROOT / "miles"
    found = {f"miles.{p.name}" for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    found |= {f"miles.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    assert found - named == set(), "add these to [tool.importlinter] layers in pyproject.toml"
