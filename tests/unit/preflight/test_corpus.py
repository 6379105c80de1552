"""The bad-input corpus through the real CLI: every case exits 2 from validate, submit and run, says what to fix,
and leaves nothing behind: no Slurm tool called, no run directory, no file written, no child process."""

from __future__ import annotations

import multiprocessing
from collections import Counter

import pytest

from miles import cli
from tests.unit.preflight.cases import CASES, Case
from tests.unit.preflight.workspace import Workspace

COMMANDS = ("validate", "submit", "run")


def test_the_corpus_covers_every_area() -> None:
    areas = Counter(c.area for c in CASES)
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert set(areas) == {"spec", "data", "eval", "model", "reward", "resume", "mixed"}, areas
    assert all(n >= 5 for area, n in areas.items() if area != "mixed"), areas


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_and_leaves_nothing(
    case: Case, command: str, ws: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = case.build(ws)
    before = ws.snapshot()
    code = cli.main([command, str(ws.spec), *extra])
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\n{out}\n{err}"
    assert err.startswith(f"miles {command}: ") and "Traceback" not in err
    for text in case.expect:
        assert text.format(root=ws.root, spec=ws.spec) in err, err
    assert ws.slurm_calls() == []
    assert ws.snapshot() == before  # no run directory, no spec/plan/script, nothing half-written
    assert not (ws.root / "runs" / "t" / "spec.toml").exists()
    assert multiprocessing.active_children() == []
