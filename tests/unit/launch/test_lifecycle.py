"""``miles status``'s verdict from Slurm's states and the run directory, and the control files of one launch.

What Slurm says is given here as :func:`miles.launch.submission.job_states` returns it
for an ended job (the local-cluster tests in tests/integration/test_lifecycle.py
get the same from a real sacct); the run directory is real.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miles.job import rundir
from miles.launch import lifecycle


def _ended(state: str, exit_code: str = "0:0") -> dict[str, dict[str, str]]:
    return {"7": {"State": state, "ExitCode": exit_code}}


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    (tmp_path / "control").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    ("files", "states", "state", "needle"),
    [
        ({"control/done": '{"num_rollout": 3}'}, _ended("COMPLETED"), "complete", "the run is complete"),
        ({"control/done": "selftest\n"}, _ended("COMPLETED"), "complete", "the self-test passed"),
        ({"control/stop-7": '{"save": true}'}, _ended("CANCELLED"), "cancelled", "after saving a checkpoint"),
        ({"control/stop-7": '{"save": false}'}, _ended("CANCELLED"), "cancelled", "at once, without a save"),
        ({}, _ended("CANCELLED"), "cancelled", "by scancel (not through `miles cancel`)"),
        ({"control/stop-6": '{"save": true}'}, _ended("CANCELLED"), "cancelled", "by scancel"),  # another job's
        ({}, _ended("FAILED", "2:0"), "failed", "failed (FAILED, exit 2:0)"),
        ({"control/done": "selftest\n"}, _ended("FAILED", "1:0"), "failed", "FAILED"),  # a stale flag is no success
        ({}, _ended("COMPLETED"), "ended", "before the run was complete"),
        ({}, {}, "unknown", "Slurm has no record of this job"),
    ],
    ids=[
        "complete",
        "selftest",
        "cancel-save",
        "cancel-now",
        "scancel",
        "other-jobs-stop",
        "failed",
        "stale-done",
        "ended",
        "unknown",
    ],
)
def test_verdict_of_an_ended_job(
    run_dir: Path, files: dict[str, str], states: dict[str, dict[str, str]], state: str, needle: str
) -> None:
    for name, text in files.items():
        (run_dir / name).write_text(text)
    v = lifecycle.verdict(run_dir, "7", states)
    assert v.state == state and needle in v.detail, v


def test_clear_stale_control_removes_flags_of_earlier_launches_only(run_dir: Path) -> None:
    for name in ("preempt", "done", "stop-3", "stop-12", "notes.txt"):
        (run_dir / "control" / name).write_text("x")
    rundir.clear_stale_control(run_dir)
    assert sorted(p.name for p in (run_dir / "control").iterdir()) == ["notes.txt"]
    rundir.clear_stale_control(run_dir / "missing")  # nothing there: nothing to do


def test_err_head_is_the_first_non_empty_lines(run_dir: Path) -> None:
    (run_dir / "slurm-7.err").write_text(
        "\nslurmstepd: error: execve(): /x/python: No such file or directory\n\n"
        + "".join(f"line {i}\n" for i in range(40))
    )
    head = lifecycle.err_head(run_dir, "7")
    assert head[0].endswith("No such file or directory") and len(head) == lifecycle.ERR_HEAD_LINES
    assert lifecycle.err_head(run_dir, "8") == []


def test_status_of_a_local_run_directory(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A `miles run` directory has no job.json: status reads the run directory alone."""
    (run_dir / "spec.toml").write_text("")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"rollout": 0}) + "\n")
    assert lifecycle.status(str(run_dir)) == 0
    out = capsys.readouterr().out
    assert "a local run (`miles run`, no Slurm job)" in out and "state: not complete" in out
    assert 'last metrics: {"rollout": 0}' in out
    (run_dir / "control" / "done").write_text("{}")
    lifecycle.status(str(run_dir))
    assert "state: complete" in capsys.readouterr().out
