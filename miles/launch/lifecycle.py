"""A submitted run's life: ``miles cancel``, ``miles status``, and the control files of one launch.

Stopping has one meaning per way (docs/cli.md and docs/admin.md say the same):

* ``miles cancel RUN_DIR`` (save, the default): the run ends and is never
  requeued. It writes ``control/stop-<job id>``, tells Slurm the job may not be
  requeued any more (``scontrol update JobId=<id> Requeue=0``), then touches
  ``control/preempt``, the flag a time limit's USR1 sets: the ranks agree at the
  next step boundary, save a checkpoint and exit 0; the batch shell finds its
  stop file and cancels its own job instead of requeueing it (sacct: ``CANCELLED``).
  A job still queued is cancelled at once (there is nothing to save).
* ``miles cancel --now RUN_DIR``: the same stop file and ``Requeue=0``, then
  ``scancel``: every task gets SIGTERM and, ``KillWait`` seconds later, SIGKILL.
  Nothing waits for a save; the run resumes later from its last periodic checkpoint.
* Preemption (USR1 or SIGTERM from Slurm, with no stop file of this job): the
  ranks save and the job requeues itself. It is the only thing that requeues.

The stop file is named after its job id, so a stop request of an earlier job (or
one found in a directory copied from elsewhere) never touches a later job; the
batch shell removes ``control/preempt`` and ``control/done`` at every start, so
flags of an earlier life, job or self-test cannot end or block the next.

``miles status`` reads Slurm (squeue while the job is known there, sacct after)
and the run directory together, and names one of: queued, running,
preempted-and-requeued, cancelled, failed, complete; for a failed job it prints
the head of ``slurm-<id>.err``, where a job that failed at start wrote why.

This module must not import torch (it runs on login nodes).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from pathlib import Path

from miles.job import rundir
from miles.launch.submission import check_controller, job_states, slurm_command

ERR_HEAD_LINES = 15
"""Lines of ``slurm-<id>.err`` that ``miles status`` prints for a failed job."""

_FAILED = ("FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")
_ACTIVE = (
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "SIGNALING",
    "STAGE_OUT",
)


def stop_path(run_dir: Path, job_id: str) -> Path:
    """The stop request of job ``job_id``: that job's batch shell (and no other) ends instead of requeueing."""
    return run_dir / rundir.CONTROL / f"stop-{job_id}"


def _job_id(run_dir: Path) -> str:
    return str(rundir.read_json(run_dir / rundir.JOB)["job_id"])


def _scontrol_job(job_id: str) -> dict[str, str]:
    """``scontrol -o show job`` of the leader as key=value pairs (empty once Slurm forgot the job)."""
    res = slurm_command(["scontrol", "-o", "show", "job", job_id], check=False)
    if res.returncode != 0 or not res.stdout.strip():
        return {}
    first = res.stdout.strip().splitlines()[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"(\w+)=(\S*)", first)}


def cancel(run_dir: str, now: bool = False) -> int:
    """End a submitted run for good: save first (default) or at once (``now``); never requeued."""
    path = Path(run_dir)
    job_id = _job_id(path)
    check_controller()
    info = _scontrol_job(job_id)
    state = info.get("JobState", "")
    if state not in _ACTIVE:
        print(f"job {job_id} is not queued or running ({state.lower() or 'unknown to Slurm'}); nothing to cancel")
        return 0
    running = state in ("RUNNING", "CONFIGURING", "SUSPENDED")
    save = running and not now
    rundir.write_json(
        stop_path(path, job_id),
        {
            "job_id": job_id,
            "save": save,
            "restart": int(info.get("Restarts", "0") or 0),
            "requested_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        },
    )
    # Before any signal: a requeue already under way in the batch shell now fails.
    slurm_command(["scontrol", "update", f"JobId={job_id}", "Requeue=0"], check=False)
    if save:
        # The flag the ranks poll at step boundaries, written directly rather than through a signal to the batch
        # shell (a signal can arrive before the shell's trap exists). The shell removes a stale flag at its start
        # and then looks for the stop file: either it ends there, or this flag, written after, survives.
        rundir.write_atomic(path / rundir.PREEMPT, f"miles cancel of job {job_id}\n")
        print(
            f"job {job_id}: asked the ranks to save at the next step boundary, then the job ends (CANCELLED, "
            f"not requeued).\n  watch:        miles status {path}\n"
            f"  end it now:   miles cancel --now {path} (no save; resumes from the last checkpoint)"
        )
    else:
        slurm_command(["scancel", job_id])  # the het leader's id cancels every component
        print(f"cancelled job {job_id} now ({'no save' if running else 'it had not started'}); not requeued")
    return 0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What ``miles status`` concludes: one word for scripts, and a sentence for people."""

    state: str  # queued | running | requeued | cancelled | failed | complete | ended | unknown | local
    detail: str


def _done_text(run_dir: Path) -> str | None:
    try:
        return (run_dir / rundir.DONE).read_text()
    except FileNotFoundError:
        return None


def _restarts_in_accounting(job_id: str) -> int:
    res = slurm_command(["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State"], check=False)
    leader = [ln for ln in res.stdout.splitlines() if ln.split("|")[0] in (job_id, f"{job_id}+0")]
    return sum(1 for ln in leader if ln.split("|")[1].startswith("REQUEUED"))


def verdict(run_dir: Path, job_id: str, states: dict[str, dict[str, str]]) -> Verdict:
    """Slurm's states of ``job_id`` (see :func:`job_states`) read together with the run directory."""
    if not states:
        return Verdict(
            "unknown",
            "Slurm has no record of this job: not in squeue, and accounting (sacct) has no "
            "entry yet (it can lag a few seconds behind a job's end) or keeps none (no slurmdbd)",
        )
    names = {st.get("State", "?") for st in states.values()}
    stop = stop_path(run_dir, job_id)
    if names & set(_ACTIVE):
        restarts = int(_scontrol_job(job_id).get("Restarts", "0") or 0)
        if stop.exists():
            how = "saving, then ending" if rundir.read_json(stop).get("save") else "ending now"
            return Verdict("running", f"cancel requested ({how}); it will not be requeued")
        if "PENDING" in names and restarts:
            return Verdict("requeued", f"preempted and requeued (restart {restarts}); waiting to start again")
        if "PENDING" in names:
            return Verdict("queued", "queued, waiting for resources")
        life = f" (restart {restarts})" if restarts else ""
        if rundir.preempt_requested(run_dir):
            return Verdict(
                "running",
                f"running{life}; a checkpoint-and-stop was requested (control/preempt): "
                "the ranks save at the next step boundary and the job requeues",
            )
        return Verdict("running", f"running{life}")
    done = _done_text(run_dir)
    if done is not None and done.startswith("selftest") and names == {"COMPLETED"}:
        return Verdict("complete", "the self-test passed")
    if done is not None and names == {"COMPLETED"}:
        return Verdict("complete", "the run is complete")
    if stop.exists():
        how = "after saving a checkpoint" if rundir.read_json(stop).get("save") else "at once, without a save"
        return Verdict("cancelled", f"cancelled by `miles cancel` {how}; resubmit the spec to resume")
    if "CANCELLED" in names:
        return Verdict("cancelled", "cancelled by scancel (not through `miles cancel`); resubmit the spec to resume")
    failed = sorted(names & set(_FAILED))
    if failed:
        codes = {st.get("ExitCode", "") for st in states.values() if st.get("State") in failed} - {""}
        exit_code = f", exit {', '.join(sorted(codes))}" if codes else ""
        return Verdict(
            "failed",
            f"failed ({', '.join(failed)}{exit_code}); resubmit the spec to resume "
            "from the last checkpoint once the cause is fixed",
        )
    return Verdict(
        "ended",
        f"ended ({', '.join(sorted(names))}) before the run was complete; "
        "resubmit the spec to resume from the last checkpoint",
    )


def err_head(run_dir: Path, job_id: str, lines: int = ERR_HEAD_LINES) -> list[str]:
    """The first ``lines`` non-empty lines of ``slurm-<id>.err``: where a job that failed at start wrote why."""
    err = run_dir / f"slurm-{job_id}.err"
    try:
        text = err.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [ln for ln in text.splitlines() if ln.strip()][:lines]


def _progress(run_dir: Path) -> list[str]:
    lines = []
    metrics = run_dir / rundir.METRICS
    if metrics.exists():
        last = metrics.read_text().strip().splitlines()[-1:] if metrics.stat().st_size else []
        lines.append(f"last metrics: {last[0][:300]}" if last else "metrics.jsonl is empty")
    else:
        lines.append("no metrics yet")
    ckpts = run_dir / rundir.CHECKPOINTS
    names = sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) if ckpts.is_dir() else []
    lines.append(f"checkpoints: {', '.join(names[-3:])}" if names else "no checkpoints yet")
    engines = sorted(p.name for p in (run_dir / rundir.ENGINES).glob("engine-*.json"))
    if engines:
        lines.append(f"engine announcements: {len(engines)}")
    return lines


def _local_status(path: Path) -> int:
    """A ``miles run`` directory: no Slurm job, so the run directory alone speaks."""
    done = _done_text(path)
    state = "complete" if done is not None else ("stopping" if rundir.preempt_requested(path) else "not complete")
    print(f"run {path.resolve()}: a local run (`miles run`, no Slurm job)\n  state: {state}")
    for line in _progress(path):
        print(f"  {line}")
    return 0


def status(run_dir: str) -> int:
    path = Path(run_dir)
    if not (path / rundir.JOB).exists() and (path / rundir.SPEC).exists():
        return _local_status(path)
    job = rundir.read_json(path / rundir.JOB)
    job_id = str(job["job_id"])
    states = job_states(job_id)
    print(f"run {path.resolve()}: job {job_id} ({job.get('mode', '?')}), submitted {job.get('submitted_at', '?')}")
    for jid, st in sorted(states.items()):
        extra = ", ".join(f"{k.lower()} {v}" for k, v in st.items() if k != "State" and k != "JobID" and v)
        print(f"  {jid}: {st.get('State', '?')}" + (f" ({extra})" if extra else ""))
    v = verdict(path, job_id, states)
    if v.state == "cancelled" and not any(st.get("State") in _ACTIVE for st in states.values()):
        restarts = _restarts_in_accounting(job_id)
        if restarts:
            v = Verdict(v.state, f"{v.detail} (after {restarts} requeue(s))")
    print(f"  state: {v.state}: {v.detail}")
    for line in _progress(path):
        print(f"  {line}")
    if v.state in ("failed", "ended", "unknown"):
        head = err_head(path, job_id)
        if head:
            print(f"  head of {path / f'slurm-{job_id}.err'}:")
            for line in head:
                print(f"    {line[:300]}")
    return 0
