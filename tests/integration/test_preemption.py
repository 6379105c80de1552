"""Preemption on a real Slurm cluster: save, requeue, resume, and end as if never interrupted.

The CPU quickstart (``configs/quickstart.toml``, small batches, ``ckpt.save_interval=2``)
runs as a real ``miles submit`` job on ``slurm/local-cluster.sh`` with the real
loop: embedded engines serving HTTP, two FSDP trainer ranks over gloo, weight sync.

* USR1 mid-run (``scancel --signal=USR1 --batch``, what Slurm sends
  ``slurm.signal_lead_time`` seconds before the time limit): the batch shell's trap
  touches ``control/preempt``, the ranks agree at the next boundary, save and exit
  0, the batch shell requeues the job; the next life (``SLURM_RESTART_COUNT`` 1)
  resumes from the checkpoint and completes. ``metrics.jsonl`` and
  ``final/model.safetensors`` must equal, bit for bit, those of the same spec run
  straight through by ``miles run`` on this machine (one baseline serves both
  modes: two trainer ranks and two engines either way, and every sampling seed is
  a pure function of the sample, so the layout of the job does not change a bit).
* The time limit: Slurm itself sends the USR1; the job saves within its lead time
  and requeues. Its second life is preempted too and, with ``max_requeues = 1``,
  ends FAILED with the clear message instead of requeueing again.

Test-side nudge, not product behaviour: a requeued job waits ``cred_expire`` + 1 s
(11 s here) before it may start, and a requeued het job then waits for a backfill
pass that may come much later. As in slurm/FINDINGS, the test sets
``StartTime=now`` on the requeued job two seconds after the requeue (never in the
same second: Slurm would revoke the new credential and fail the job). On a real
cluster the scheduler starts the job by itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from miles.launch import submission
from miles.spec import load_spec

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.toml"
POLL_S = 0.2
ROLLOUTS = 8

SPLIT = ['cluster.mode="split"', "cluster.rollout_num_nodes=1", "cluster.rollout_num_gpus=2"]


def _overrides(run_dir: Path, rollouts: int) -> list[str]:
    return [
        f'run.name="{run_dir.name}"',
        f'run.run_dir="{run_dir}"',
        f"run.num_rollout={rollouts}",
        "run.use_tensorboard=false",
        "run.plot=false",
        f'rollout.prompt_data="{ROOT / "configs" / "data" / "majority-digit.jsonl"}"',
        "rollout.rollout_batch_size=8",
        "rollout.n_samples_per_prompt=4",
        "train.global_batch_size=32",
        "train.micro_batch_size=8",
        "ckpt.save_interval=2",
        f'slurm.python="{sys.executable}"',
    ]


def _submit(run_dir: Path, rollouts: int, extra: list[str]) -> str:
    spec = load_spec(str(QUICKSTART), _overrides(run_dir, rollouts) + extra)
    assert submission.submit(spec) == 0
    return str(json.loads((run_dir / "job.json").read_text())["job_id"])


def _logs(run_dir: Path, job_id: str) -> str:
    return "".join(
        (run_dir / f"slurm-{job_id}.{ext}").read_text()
        for ext in ("out", "err")
        if (run_dir / f"slurm-{job_id}.{ext}").exists()
    )


def _scontrol_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=20).stdout


def _restarts(job_id: str) -> int:
    m = re.search(r"\bRestarts=(\d+)", _scontrol_job(job_id))
    return int(m.group(1)) if m else -1


def _metric_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait_for(what: str, cond: Callable[[], bool], run_dir: Path, job_id: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            subprocess.run(["scancel", job_id], timeout=20)
            pytest.fail(f"job {job_id}: {what} did not happen within {timeout:.0f} s\n{_logs(run_dir, job_id)[-6000:]}")
        time.sleep(POLL_S)


def _poke_after_requeue(run_dir: Path, job_id: str, restarts: int, timeout: float = 90) -> None:
    """Wait until the job is pending again after its ``restarts``-th requeue, then start it now (test-side nudge)."""
    _wait_for(
        f"requeue #{restarts}",
        lambda: _restarts(job_id) >= restarts and "JobState=PENDING" in _scontrol_job(job_id),
        run_dir,
        job_id,
        timeout,
    )
    time.sleep(2.0)  # never in the requeue's own second: Slurm would revoke the new credential
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True, timeout=20)


def _wait_gone(run_dir: Path, job_id: str, timeout: float) -> None:
    def gone() -> bool:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True, text=True, timeout=20)
        return out.returncode == 0 and not out.stdout.strip()

    _wait_for("leaving the queue", gone, run_dir, job_id, timeout)


def _sacct_states(job_id: str, timeout: float = 20) -> list[str]:
    """Every record of the job's components in accounting, requeued lives included (``sacct -D``)."""
    end = time.monotonic() + timeout
    states: list[str] = []
    while time.monotonic() < end:
        res = subprocess.run(
            ["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        states = [line.split("|")[1].split()[0] for line in res.stdout.splitlines() if "|" in line]
        if states and all(s not in ("PENDING", "RUNNING", "COMPLETING") for s in states):
            return states
        time.sleep(POLL_S)
    pytest.fail(f"sacct never showed job {job_id} finished: {states}")


def _final(run_dir: Path) -> tuple[str, dict[str, torch.Tensor]]:
    return (run_dir / "metrics.jsonl").read_text(), load_file(str(run_dir / "final" / "model.safetensors"))


def _assert_identical(run_dir: Path, baseline: tuple[str, dict[str, torch.Tensor]]) -> None:
    metrics, weights = _final(run_dir)
    base_metrics, base_weights = baseline
    assert metrics == base_metrics
    assert weights.keys() == base_weights.keys()
    for name, tensor in weights.items():
        assert tensor.dtype == base_weights[name].dtype and torch.equal(tensor, base_weights[name]), name


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, torch.Tensor]]:
    """The same spec straight through, by ``miles run`` on this machine (no Slurm)."""
    run_dir = tmp_path_factory.mktemp("straight") / "straight"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MILES_FAULT", None)
    cmd = [sys.executable, "-m", "miles.cli", "run", str(QUICKSTART)]
    for o in _overrides(run_dir, ROLLOUTS):
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == ROLLOUTS
    return _final(run_dir)


@pytest.fixture()
def quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """sbatch exports this environment to the job: one thread per rank, no selftest, no injected faults."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for var in ("MILES_SELFTEST", "MILES_SELFTEST_HOLD", "MILES_FAULT"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("mode", ["colocate", "split"])
def test_usr1_saves_requeues_and_resumes_exactly(
    mode: str, tmp_path: Path, quiet_env: None, baseline: tuple[str, dict[str, torch.Tensor]]
) -> None:
    run_dir = tmp_path / f"usr1-{mode}"
    job_id = _submit(run_dir, ROLLOUTS, SPLIT if mode == "split" else [])
    _wait_for("a first metrics row", lambda: _metric_rows(run_dir) >= 1, run_dir, job_id, 150)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=20)
    _poke_after_requeue(run_dir, job_id, 1)
    _wait_gone(run_dir, job_id, 150)

    logs = _logs(run_dir, job_id)
    assert "received SIGUSR1" in logs and "preempted; saved the state before rollout" in logs, logs[-6000:]
    assert f"requeueing job {job_id} (restart 1 of 3)" in logs, logs[-6000:]
    assert f"miles: job {job_id}, restart 1," in logs, logs[-6000:]  # the new life saw SLURM_RESTART_COUNT=1
    m = re.search(r"miles: resumed from (\S+) at rollout (\d+)", logs)
    assert m and 0 < int(m.group(2)) < ROLLOUTS and Path(m.group(1)).parent == run_dir / "checkpoints", logs[-6000:]
    assert "miles: run complete" in logs
    assert ": Killed" not in logs and "forcing job termination" not in logs, logs[-6000:]  # steps stopped by TERM
    states = _sacct_states(job_id)
    components = 2 if mode == "split" else 1
    assert states.count("REQUEUED") == components and states.count("COMPLETED") == components, states
    _assert_identical(run_dir, baseline)


def test_time_limit_saves_in_lead_time_requeues_and_max_requeues_stops(tmp_path: Path, quiet_env: None) -> None:
    """Slurm's own USR1 before a 2-minute limit; then a second preemption beyond ``max_requeues = 1``.

    The signal comes 30 s into the job (90 s before its limit), leaving the save 90 s: enough on a loaded machine,
    where a 30 s lead was once missed while another heavy test shared the CPU."""
    run_dir = tmp_path / "timelimit"
    # Far more rollouts than fit in two minutes: only the time limit's signal can stop the first life.
    job_id = _submit(run_dir, 100_000, ['slurm.time="00:02:00"', "slurm.signal_lead_time=90", "slurm.max_requeues=1"])
    t0 = time.monotonic()
    _poke_after_requeue(run_dir, job_id, 1, timeout=200)
    first_life = time.monotonic() - t0
    logs = _logs(run_dir, job_id)
    assert "received SIGUSR1" in logs and "preempted; saved the state before rollout" in logs, logs[-6000:]
    assert f"requeueing job {job_id} (restart 1 of 1)" in logs
    assert first_life < 135, f"the first life took {first_life:.0f} s: the USR1 came after the 120 s limit"

    # Second life: preempt it as soon as it runs; max_requeues = 1 is reached, so it must not requeue.
    _wait_for(
        "the second life", lambda: f"miles: job {job_id}, restart 1," in _logs(run_dir, job_id), run_dir, job_id, 90
    )
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=20)
    _wait_gone(run_dir, job_id, 120)
    logs = _logs(run_dir, job_id)
    assert "already requeued 1 time(s) (slurm.max_requeues = 1); not requeueing" in logs, logs[-6000:]
    assert logs.count("preempted; saved the state before rollout") == 2
    assert _restarts(job_id) == 1
    assert _sacct_states(job_id) == ["REQUEUED", "FAILED"]
    assert not (run_dir / "control" / "done").exists()
    assert any((run_dir / "checkpoints").iterdir())
