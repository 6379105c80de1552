"""`miles validate` on bad specs exits 2 with the message on stderr; the spec path never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from miles import cli
from tests.unit.spec.specfiles import SpecFiles, line_of

ROOT = Path(__file__).parents[3]


def test_validate_bad_spec_exits_2(specs: SpecFiles, capsys: pytest.CaptureFixture[str]) -> None:
    path, text = specs.write({"rollout": {"rollout_batch_sise": 4}})
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    line = line_of(text, "rollout", "rollout_batch_sise")
    assert err.startswith(f"miles validate: error: {path}:{line}: [rollout] rollout_batch_sise: unknown key"), err
    assert "did you mean rollout_batch_size?" in err and "Traceback" not in err


def test_set_errors_reach_the_cli(specs: SpecFiles, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = specs.write()
    assert cli.main(["plan", str(path), "--set", "train.global_batch_size=3"]) == 2
    assert "--set train.global_batch_size=3: [train] global_batch_size:" in capsys.readouterr().err


def test_installed_command(specs: SpecFiles) -> None:
    path, _ = specs.write({"run": {"seed": "x"}, "perf": {"tp": 0}})
    miles = Path(sys.executable).parent / "miles"
    proc = subprocess.run([str(miles), "validate", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "2 problems in the run spec:" in proc.stderr and "[run] seed: expected an integer" in proc.stderr


def test_spec_and_cli_do_not_import_torch() -> None:
    code = (
        "import miles.cli, miles.spec, miles.spec.reference, sys; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_loading_a_spec_does_not_import_torch() -> None:
    code = (
        "import sys; from miles.spec import load_spec, spec_to_toml; "
        "spec_to_toml(load_spec('configs/quickstart.toml')); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_validate_good_spec_exits_0(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert cli.main(["validate", "configs/quickstart.toml", "--set", "run.name=qs2"]) == 0
    out = capsys.readouterr().out
    assert "configs/quickstart.toml" in out
