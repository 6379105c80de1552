"""``miles submit``: a planned run handed to Slurm (``status`` and ``cancel``: :mod:`miles.launch.lifecycle`).

Which tool does what (docs/slurm.md says the same):

* the job script is the planner's (:func:`miles.plan.render_script`), submitted
  with ``sbatch --parsable`` for both modes: submitit writes its own script from
  one resource set and cannot express a heterogeneous job (``#SBATCH hetjob``);
* :func:`job_states` asks ``squeue`` while the job is queued or running, then
  ``sacct`` (accounting), and parses sacct's output with submitit's
  ``SlurmInfoWatcher.read_info`` (which keeps het components ``123+0``, ``123+1``);
* every Slurm command runs with a timeout, and an unreachable controller is a
  :class:`~miles.errors.UserError` (exit 2) before anything is written.

Nothing half-made is left behind: a new run directory is assembled under a
temporary name and renamed into place before ``sbatch`` (the job may start at
once and must find its files), and removed again if ``sbatch`` fails. An
existing run directory (a resubmission to resume) gets its previous files back
if the submission fails.

This module must not import torch (it runs on login nodes).
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from miles import plan as planning
from miles.errors import UserError
from miles.job import enginekey, rundir
from miles.launch import lock
from miles.plan import Plan
from miles.spec import spec_to_toml
from miles.spec.tables import Spec

QUERY_TIMEOUT_S = 20.0
"""Seconds any squeue/sinfo/sacct/scontrol call may take before the cluster counts as unreachable."""

SUBMIT_TIMEOUT_S = 60.0


def slurm_command(
    args: list[str], timeout: float = QUERY_TIMEOUT_S, cwd: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a Slurm client command with a timeout; a missing tool or a hang becomes a UserError."""
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except FileNotFoundError as e:
        raise UserError(
            f"`{args[0]}` is not installed on this host: run `miles submit` where the Slurm client "
            "tools are (a login node), or use `miles run` to run locally without Slurm"
        ) from e
    except subprocess.TimeoutExpired as e:
        raise UserError(
            f"`{' '.join(args)}` did not answer within {timeout:.0f} s: the Slurm controller is "
            f"unreachable or overloaded (SLURM_CONF={os.environ.get('SLURM_CONF', 'default')})"
        ) from e
    if check and res.returncode != 0:
        msg = (res.stderr or res.stdout).strip()
        raise UserError(f"`{' '.join(args)}` failed (exit {res.returncode}): {msg}")
    return res


def check_controller() -> None:
    """Fail fast and clearly when slurmctld does not answer (``scontrol ping`` returns at once)."""
    res = slurm_command(["scontrol", "ping"], check=False)
    if res.returncode != 0 or "UP" not in res.stdout:
        first = (res.stdout or res.stderr).strip().splitlines()[:1]
        raise UserError(
            "the Slurm controller is down or unreachable (`scontrol ping`: "
            f"{first[0] if first else 'no answer'}); nothing was submitted or written. Check that slurmctld runs "
            f"and SLURM_CONF ({os.environ.get('SLURM_CONF', 'default')}) points at this cluster's slurm.conf."
        )


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    name: str
    nodes: tuple[str, ...]
    max_gpus_per_node: int
    max_cpus_per_node: int


_GPU_GRES = re.compile(r"gpu(?::[A-Za-z0-9_.-]+)?:(\d+)")


def gpus_in_gres(gres: str) -> int:
    """GPUs in an sinfo ``%G`` field such as ``gpu:4``, ``gpu:a100:8(S:0-1)`` or ``(null)``."""
    return sum(int(m.group(1)) for m in _GPU_GRES.finditer(gres))


def partition_info(name: str) -> PartitionInfo:
    """Nodes, GPUs and CPUs of partition ``name`` ('' = the default partition) from ``sinfo``."""
    res = slurm_command(["sinfo", "-h", "-N", "-o", "%N|%P|%c|%G"])
    rows = [line.split("|") for line in res.stdout.splitlines() if line.count("|") == 3]
    partitions = {p.rstrip("*") for _, p, _, _ in rows}
    if not name:
        defaults = {p.rstrip("*") for _, p, _, _ in rows if p.endswith("*")}
        if not defaults:
            raise UserError(
                "this cluster has no default partition: set slurm.partition "
                f"(partitions: {', '.join(sorted(partitions))})"
            )
        name = defaults.pop()
    mine = [r for r in rows if r[1].rstrip("*") == name]
    if not mine:
        raise UserError(
            f"slurm.partition = {name!r} does not exist on this cluster; choose one of: {', '.join(sorted(partitions))}"
        )
    return PartitionInfo(
        name=name,
        nodes=tuple(sorted({r[0] for r in mine})),
        max_gpus_per_node=max(gpus_in_gres(r[3]) for r in mine),
        max_cpus_per_node=max(int(r[2]) for r in mine if r[2].isdigit()),
    )


_NODE_FIELD = {
    "engines": "cluster.rollout_num_nodes",
    "trainers": "cluster.actor_num_nodes",
    "colocated": "cluster.actor_num_nodes",
}
_GPU_FIELD = {
    "engines": "cluster.gpus_per_node (engines use whole nodes)",
    "trainers": "cluster.actor_num_gpus_per_node",
    "colocated": "cluster.actor_num_gpus_per_node",
}


def check_fits(spec: Spec, plan: object) -> list[str]:
    """Every way the plan's components exceed their partitions, as messages naming the field to change."""

    assert isinstance(plan, Plan)
    problems: list[str] = []
    used: dict[str, int] = {}
    infos: dict[str, PartitionInfo] = {}
    for comp in plan.components:
        info = infos.get(comp.partition) or partition_info(comp.partition)
        infos[comp.partition] = info
        where = (
            f"partition {info.name!r} ({len(info.nodes)} nodes, at most {info.max_gpus_per_node} GPUs and "
            f"{info.max_cpus_per_node} CPUs per node)"
        )
        label = f"het group {comp.het_group} ({comp.role})" if plan.mode == "split" else "the job"
        if comp.nodes > len(info.nodes):
            problems.append(
                f"{label} needs {comp.nodes} nodes but {where}; lower {_NODE_FIELD[comp.role]} or choose "
                "a bigger slurm.partition"
            )
        if comp.gpus_per_node > info.max_gpus_per_node:
            problems.append(
                f"{label} needs {comp.gpus_per_node} GPUs per node but {where}; lower "
                f"{_GPU_FIELD[comp.role]} or set cluster.gpus_per_node to what the nodes have"
            )
        cpus = comp.cpus_per_task * comp.tasks_per_node
        if cpus > info.max_cpus_per_node:
            problems.append(
                f"{label} needs {cpus} CPUs per node ({comp.tasks_per_node} tasks x {comp.cpus_per_task}) "
                f"but {where}; lower cluster.cpus_per_node"
            )
        used[info.name] = used.get(info.name, 0) + comp.nodes
    if spec.slurm.exclusive and plan.mode == "split":
        sizes = {i.name: len(i.nodes) for i in infos.values()}
        for name, n in used.items():
            if n > sizes[name]:
                problems.append(
                    f"the het components together need {n} whole nodes (slurm.exclusive) but partition "
                    f"{name!r} has {sizes[name]}; use fewer nodes or slurm.rollout_partition"
                )
    return problems


def _write_files(target: Path, spec: Spec, spec_text: str, plan_text: str, script: str) -> None:
    enginekey.ensure(target, spec)  # the job reads the key from here; the script never holds it
    rundir.write_atomic(target / rundir.SPEC, spec_text)
    rundir.write_atomic(target / rundir.PLAN, plan_text)
    rundir.write_atomic(target / rundir.SCRIPT, script)
    (target / rundir.LOGS).mkdir(exist_ok=True)
    (target / rundir.CONTROL).mkdir(exist_ok=True)


def _active_job(run_dir: Path) -> str | None:
    """The job id of ``run_dir`` if Slurm still has it queued or running."""
    try:
        job = rundir.read_json(run_dir / rundir.JOB)
    except UserError:
        return None
    jid = str(job.get("job_id", ""))
    if not jid:
        return None
    res = slurm_command(["squeue", "-h", "-j", jid, "-o", "%i"], check=False)
    return jid if res.returncode == 0 and res.stdout.strip() else None


def _sbatch(script_path: Path, cwd: Path) -> str:
    res = slurm_command(["sbatch", "--parsable", str(script_path)], timeout=SUBMIT_TIMEOUT_S, cwd=str(cwd))
    job_id = res.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise UserError(f"sbatch answered {res.stdout.strip()!r} instead of a job id")
    return job_id


def submit(spec: Spec, dry_run: bool = False, test_only: bool = False) -> int:
    """Plan, write the run directory, submit; see the module docstring for the guarantees."""

    plan = planning.make_plan(spec)
    script = planning.render_script(spec, plan)
    if dry_run:
        sys.stdout.write(script)
        return 0
    check_controller()
    problems = check_fits(spec, plan)
    if problems:
        raise UserError("the job does not fit this cluster; nothing was submitted:\n  " + "\n  ".join(problems))
    cwd = Path.cwd()
    final = (cwd / plan.run_dir).resolve()
    if test_only:
        with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
            f.write(script)
        try:
            res = slurm_command(["sbatch", "--test-only", f.name], timeout=SUBMIT_TIMEOUT_S, cwd=str(cwd), check=False)
        finally:
            os.unlink(f.name)
        answer = (res.stderr + res.stdout).strip()
        print(answer)
        if res.returncode != 0:
            raise UserError(f"Slurm would not accept this job: {answer}")
        return 0

    spec_text, plan_text = spec_to_toml(spec), planning.to_json(plan)
    history: list[str] = []
    if final.exists():
        active = _active_job(final)
        if active:
            raise UserError(
                f"{final} belongs to job {active}, which is still queued or running; "
                f"`miles cancel {final}` first, or set run.run_dir to a new directory"
            )
        lock.check_free(final, wait_live_s=20)  # a `miles run` of it, or a job still in its epilogue
        old = {
            name: (final / name).read_text()
            for name in (rundir.SPEC, rundir.PLAN, rundir.SCRIPT, rundir.JOB)
            if (final / name).exists()
        }
        if rundir.JOB in old:
            prev = rundir.read_json(final / rundir.JOB)
            history = [*prev.get("history", []), str(prev.get("job_id"))]
        had_key = (final / enginekey.KEY_FILE).exists()
        rundir.clear_stale_control(final)  # flags of an earlier job or self-test must not reach this one
        _write_files(final, spec, spec_text, plan_text, script)
        try:
            job_id = _sbatch(final / rundir.SCRIPT, cwd)
        except BaseException:
            if not had_key:
                (final / enginekey.KEY_FILE).unlink(missing_ok=True)
            for name in (rundir.SPEC, rundir.PLAN, rundir.SCRIPT):
                if name in old:
                    rundir.write_atomic(final / name, old[name])
                else:
                    (final / name).unlink(missing_ok=True)
            raise
    else:
        created = [p for p in final.parents if not p.exists()]  # parents this submission makes (e.g. runs/)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        try:
            _write_files(tmp, spec, spec_text, plan_text, script)
            os.rename(tmp, final)  # before sbatch: the job may start at once and must find its files
            job_id = _sbatch(final / rundir.SCRIPT, cwd)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
            for parent in created:  # innermost first; only if still empty
                try:
                    parent.rmdir()
                except OSError:
                    break
            raise
    rundir.write_json(
        final / rundir.JOB,
        {
            "job_id": job_id,
            "mode": plan.mode,
            "submitted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "submit_dir": str(cwd),
            "slurm_conf": os.environ.get("SLURM_CONF", ""),
            "history": history,
        },
    )
    print(
        f"submitted job {job_id} ({plan.mode}{', heterogeneous' if plan.mode == 'split' else ''})\n"
        f"  run directory: {final}\n"
        f"  Slurm output:  {final}/slurm-{job_id}.out (and .err)\n"
        f"  status:        miles status {final}\n"
        f"  cancel:        miles cancel {final} (saves first; --now ends at once)"
    )
    return 0


def job_states(job_id: str) -> dict[str, dict[str, str]]:
    """State of each component (``123`` or ``123+0``, ``123+1``): squeue while queued or running, else sacct."""
    res = slurm_command(["squeue", "-h", "-j", job_id, "-o", "%i|%T|%r|%N|%M"], check=False)
    states: dict[str, dict[str, str]] = {}
    if res.returncode == 0:
        for line in res.stdout.splitlines():
            jid, state, reason, nodes, elapsed = (line.split("|") + [""] * 5)[:5]
            states[jid] = {"State": state, "Reason": reason, "NodeList": nodes, "Elapsed": elapsed}
    if states:
        return states
    res = slurm_command(
        ["sacct", "-X", "-j", job_id, "-o", "JobID,State,ExitCode,NodeList,Elapsed", "--parsable2"], check=False
    )
    if res.returncode != 0:
        return {}
    from submitit.slurm.slurm import SlurmInfoWatcher

    info = SlurmInfoWatcher().read_info(res.stdout)
    for st in info.values():  # "CANCELLED by 0" -> "CANCELLED"
        st["State"] = st.get("State", "").split(" ")[0]
    return info
