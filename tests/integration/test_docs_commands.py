"""slurm.md's "Trying miles on it" and cli.md's status/cancel examples, run as written on the local cluster.

The commands are taken from the docs (tests/unit/test_docs_commands.py extracts
them) and run through ``python -m miles.cli`` in a scratch directory that looks
like a checkout: ``configs/`` and ``.venv/`` link to the real ones,
so ``configs/quickstart.toml``, ``runs/quickstart`` and ``$PWD/.venv/bin/python``
mean what they mean for a user.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.test_docs_commands import ROOT, examples

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]


def _miles(argv: tuple[str, ...], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for var in ("MILES_SELFTEST", "MILES_SELFTEST_HOLD", "MILES_FAULT"):
        env.pop(var, None)
    return subprocess.run(
        [sys.executable, "-m", "miles.cli", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_trying_miles_on_the_local_cluster_as_documented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)  # this virtual environment
    monkeypatch.setenv("PWD", str(tmp_path))  # the docs' $PWD, expanded when the commands are read
    slurm_md = [e for e in examples("docs/slurm.md") if e.line in range(70, 90)]  # the block of "Trying miles on it"
    assert [e.argv[0] for e in slurm_md] == ["submit", "status", "cancel"], slurm_md
    cli_md = [e for e in examples("docs/cli.md") if e.argv[:1] in (("status",), ("cancel",))]
    assert [e.argv for e in cli_md] == [
        ("status", "runs/quickstart"),
        ("cancel", "runs/quickstart"),
        ("cancel", "--now", "runs/quickstart"),
    ]

    submit = _miles(slurm_md[0].argv, tmp_path)
    assert submit.returncode == 0, submit.stderr
    run_dir = tmp_path / "runs" / "quickstart"
    assert f"run directory: {run_dir}" in submit.stdout
    status = _miles(slurm_md[1].argv, tmp_path)
    assert status.returncode == 0 and "state: " in status.stdout, status.stdout + status.stderr
    job_id = (run_dir / "job.json").read_text().split('"job_id": "')[1].split('"')[0]
    metrics = run_dir / "metrics.jsonl"
    end = time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().strip()):  # training: the cancel must save
        assert time.monotonic() < end, "no metrics row within 180 s"
        time.sleep(0.5)
    cancel = _miles(slurm_md[2].argv, tmp_path)
    assert cancel.returncode == 0 and "asked the ranks to save" in cancel.stdout, cancel.stdout + cancel.stderr
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, timeout=20).stdout.strip():
        assert time.monotonic() < end + 120, "the cancelled job did not end"
        time.sleep(0.5)
    logs = (run_dir / f"slurm-{job_id}.out").read_text() + (run_dir / f"slurm-{job_id}.err").read_text()
    assert "preempted; saved the state before rollout" in logs and f"job {job_id} was cancelled" in logs, logs
    assert "requeueing job" not in logs and any((run_dir / "checkpoints").iterdir()), logs
    acct = subprocess.run(
        ["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True, timeout=20
    ).stdout.split()
    assert acct[:1] == ["CANCELLED"] and "REQUEUED" not in acct, acct
    for e in cli_md:  # status, then the cancels of a job that has ended: nothing to do, exit 0
        res = _miles(e.argv, tmp_path)
        assert res.returncode == 0, res.stderr
        if e.argv[0] == "status":
            assert "state: cancelled: cancelled by `miles cancel` after saving" in res.stdout, res.stdout
        else:
            assert "nothing to cancel" in res.stdout, res.stdout
