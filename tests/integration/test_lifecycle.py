"""A run's life on a real Slurm cluster: ``miles cancel`` ends it, ``--now`` ends it at once, preemption requeues.

Each stop is tried at seeded-random moments (just queued, starting, running) on
the cheapest job that exercises the batch shell: the self-test with a hold
(``MILES_SELFTEST_HOLD``: trainer and engine ranks stay up, all-reducing the
preempt flag every 0.5 s as the loop does at step boundaries). Every job reuses
one run directory whose first job was a completed self-test, so a stale
``control/done`` (and earlier jobs' stop files) are there all along: they must
neither end nor block a later job. The outcome is checked in sacct (``-D``:
requeued lives too) and in the run directory, and ``miles status`` must name it.

Each stop runs 3 times in the default suite; ``MILES_LIFECYCLE_ROUNDS=10`` (and another
``MILES_LIFECYCLE_SEED``) makes it a soak of 10 or more each (docs/slurm.md).

A split (het) job is preempted, requeued, then cancelled: both components end.
tests/integration/test_docs_commands.py cancels a real training job (the CPU
quickstart) as the docs show and checks that its checkpoint was saved.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
from pathlib import Path

import pytest

from miles.launch import lifecycle, submission
from tests.integration.test_slurm import SPLIT, _logs, _spec, _wait_gone

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.2
ONE_NODE = "actor_num_nodes = 1\nactor_num_gpus_per_node = 1"


def _job_id(run_dir: Path) -> str:
    return str(json.loads((run_dir / "job.json").read_text())["job_id"])


def _sacct(job_id: str, timeout: float = 30) -> list[str]:
    """Every accounting record of the job (requeued lives included), once none is active."""
    end = time.monotonic() + timeout
    states: list[str] = []
    while time.monotonic() < end:
        res = subprocess.run(
            ["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        states = [ln.split("|")[1].split()[0] for ln in res.stdout.splitlines() if "|" in ln]
        if states and all(s not in ("PENDING", "RUNNING", "COMPLETING") for s in states):
            return states
        time.sleep(POLL_S)
    pytest.fail(f"sacct never showed job {job_id} finished: {states}")


def _scontrol(job_id: str) -> str:
    return subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=20).stdout


def _status(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert lifecycle.status(str(run_dir)) == 0
    return capsys.readouterr().out


def _wait(what: str, cond, run_dir: Path, job_id: str, timeout: float) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            subprocess.run(["scancel", job_id], timeout=20)
            pytest.fail(f"job {job_id}: {what} within {timeout:.0f} s\n{_logs(run_dir, job_id)[-4000:]}")
        time.sleep(POLL_S)


def _holding(run_dir: Path) -> bool:
    report = run_dir / "selftest" / "trainer-0.json"
    return report.exists() and json.loads(report.read_text()).get("phase") == "checked"


def _at_random_moment(rng: random.Random, run_dir: Path, job_id: str) -> str:
    """Wait for a seeded-random moment of the job's life; returns which."""
    moment = rng.choice(["queued", "starting", "running", "running"])
    if moment == "starting":
        time.sleep(rng.uniform(0.0, 3.0))
    elif moment == "running":
        _wait("reached the hold", lambda: _holding(run_dir), run_dir, job_id, 90)
        time.sleep(rng.uniform(0.0, 2.0))
    return moment


@pytest.mark.slow
def test_cancel_now_and_preemption_at_random_moments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MILES_SELFTEST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MILES_SELFTEST_HOLD", raising=False)
    spec = _spec(tmp_path, "life", "colocate", ONE_NODE)
    assert submission.submit(spec) == 0
    run_dir = tmp_path / "runs" / "life"
    first = _job_id(run_dir)
    _wait_gone(first, 90)
    assert _sacct(first) == ["COMPLETED"] and (run_dir / "control" / "done").read_text().startswith("selftest")
    assert "state: complete: the self-test passed" in _status(run_dir, capsys)

    monkeypatch.setenv("MILES_SELFTEST_HOLD", "600")  # the job runs until it is stopped
    rng = random.Random(int(os.environ.get("MILES_LIFECYCLE_SEED", "20261204")))
    rounds = int(os.environ.get("MILES_LIFECYCLE_ROUNDS", "3"))  # each stop, this many times (soak: 10 or more)
    actions = ["cancel", "now", "preempt"] * rounds + [rng.choice(["cancel", "now"])]
    rng.shuffle(actions)
    seen = []
    for action in actions:
        assert submission.submit(spec) == 0
        job_id = _job_id(run_dir)
        moment = _at_random_moment(rng, run_dir, job_id)
        seen.append(f"{action}@{moment}")
        if action == "preempt":
            # What Slurm sends before a time limit; preemption's SIGTERM takes the same path.
            _wait("reached the hold", lambda: _holding(run_dir), run_dir, job_id, 90)
            subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=20)
            _wait(
                "was requeued",
                lambda j=job_id: "Restarts=1" in _scontrol(j) and "JobState=PENDING" in _scontrol(j),
                run_dir,
                job_id,
                60,
            )
            assert "state: requeued: preempted and requeued (restart 1)" in _status(run_dir, capsys)
            time.sleep(2.0)  # test-side nudge (see test_preemption): never in the requeue's own second
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True, timeout=20)
            _wait("restarted", lambda j=job_id: "JobState=RUNNING" in _scontrol(j), run_dir, job_id, 60)
            time.sleep(rng.uniform(0.0, 2.0))
        now = action == "now" or (action == "preempt" and rng.random() < 0.5)
        assert lifecycle.cancel(str(run_dir), now=now) == 0
        _wait_gone(job_id, 90)
        states = _sacct(job_id)
        logs = _logs(run_dir, job_id)
        want = (["REQUEUED"] if action == "preempt" else []) + ["CANCELLED"]
        assert states == want, (seen, states, logs[-4000:])
        assert "requeueing job" in logs if action == "preempt" else "requeueing job" not in logs, (seen, logs[-4000:])
        assert "run complete" not in logs, (seen, logs[-4000:])
        stop = json.loads((run_dir / "control" / f"stop-{job_id}").read_text())
        assert stop["job_id"] == job_id
        out = _status(run_dir, capsys)
        assert "state: cancelled: cancelled by `miles cancel`" in out, (seen, out)
        if stop["save"]:  # the job was running: it ends itself, after its ranks (if they had started) stopped cleanly
            assert f"job {job_id} was cancelled" in logs, (seen, logs[-4000:])
            if "holding for" in logs:  # the ranks were running: they agreed on the request and stopped
                assert "stopped on request" in logs, (seen, logs[-4000:])
        assert not re.search(r"error: the (trainers|engines) step", logs), (seen, logs[-4000:])
    assert len(seen) == 3 * rounds + 1
    print("lifecycle:", " ".join(seen))


def test_cancel_ends_a_het_job_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Split mode: the leader's Requeue=0 and stop file end both components, CANCELLED, after a preemption too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MILES_SELFTEST", "1")
    monkeypatch.setenv("MILES_SELFTEST_HOLD", "600")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = _spec(tmp_path, "het", "split", SPLIT)
    assert submission.submit(spec) == 0
    run_dir = tmp_path / "runs" / "het"
    job_id = _job_id(run_dir)
    _wait("reached the hold", lambda: _holding(run_dir), run_dir, job_id, 90)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=20)
    _wait(
        "was requeued",
        lambda: "Restarts=1" in _scontrol(job_id) and "JobState=PENDING" in _scontrol(job_id),
        run_dir,
        job_id,
        60,
    )
    time.sleep(2.0)  # test-side nudge, as above
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True, timeout=20)
    _wait("held again", lambda: _holding(run_dir) and "JobState=RUNNING" in _scontrol(job_id), run_dir, job_id, 90)
    assert lifecycle.cancel(str(run_dir)) == 0
    _wait_gone(job_id, 90)
    states = _sacct(job_id)
    assert sorted(states) == ["CANCELLED", "CANCELLED", "REQUEUED", "REQUEUED"], (states, _logs(run_dir, job_id))
    assert "state: cancelled: cancelled by `miles cancel`" in _status(run_dir, capsys)


def test_slurm_does_not_cap_explicit_requeues_at_max_batch_requeue(tmp_path: Path) -> None:
    """docs/admin.md: `slurm.max_requeues` is the only cap; Slurm's max_batch_requeue (default 5) is not."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20).stdout
    assert "max_batch_requeue" not in config  # the default, 5
    script = tmp_path / "requeue.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH --requeue\n#SBATCH --output=/dev/null\n"
        'if [ "${SLURM_RESTART_COUNT:-0}" -lt 6 ]; then scontrol requeue "$SLURM_JOB_ID"; fi\n'
    )
    job_id = subprocess.run(
        ["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True, timeout=20
    ).stdout.strip()
    end = time.monotonic() + 120
    while "JobState=COMPLETED" not in (info := _scontrol(job_id)):
        assert time.monotonic() < end and "JobState=FAILED" not in info and "JobHeldAdmin" not in info, info
        if "JobState=PENDING" in info:
            time.sleep(2.0)  # never in the requeue's own second (see test_preemption)
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True, timeout=20)
        time.sleep(0.5)
    assert "Restarts=6" in info, info
