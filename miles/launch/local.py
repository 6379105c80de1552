"""``miles run``: the whole run on this machine, no Slurm.

The local launcher plays srun's part: it starts one process per engine and
one per trainer rank, every one running the same ``python -m miles.launch.task``
entry as a Slurm job does, with torchrun-style variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) instead of
Slurm's. So a laptop run exercises the cluster's code path.

Like the batch script it also:

* writes ``spec.toml`` and ``plan.json`` into the run directory (atomically) and
  reuses an existing run directory, so starting again resumes from the newest
  complete checkpoint;
* holds the run directory's lock (:mod:`miles.launch.lock`) for as long as it or
  any of its ranks lives, so a second run of the same directory is refused;
* writes the run's engine key (:mod:`miles.job.enginekey`) unless
  ``[rollout] engine_auth = false``;
* starts every rank with the kernel's parent-death signal
  (:mod:`miles.job.orphans`): a launcher killed even by SIGKILL takes its
  ranks, and they their engine servers, with it;
* streams every rank's output with a ``trainer 1 |`` prefix;
* ends the run when a rank dies, naming it, and stops the others: the first
  rank to fail is told whole, the ranks that end because of it in one line,
  their output kept in ``run_dir/logs/<rank>.out`` (:mod:`miles.launch.console`);
* on Ctrl-C or SIGTERM touches ``run_dir/control/preempt`` so the ranks save
  at the next step boundary, waits a grace period (``MILES_GRACE_S``, default
  120 s; a second Ctrl-C skips it), then terminates what is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from miles import plan as planning
from miles.errors import UserError
from miles.job import enginekey, orphans, rundir
from miles.job.ports import free_ports
from miles.launch import lock
from miles.launch.console import Console
from miles.plan import Plan
from miles.spec import spec_to_toml
from miles.spec.tables import Spec

_POLL_S = 0.2
_TERM_GRACE_S = 10.0


@dataclass
class Rank:
    """One process the launcher started."""

    name: str
    proc: subprocess.Popen[bytes]
    role: str
    pump: threading.Thread | None = None
    exit_code: int | None = field(default=None)


def prepare_run_dir(spec: Spec) -> tuple[Path, object, lock.RunDirLock]:
    """Plan the run, take the run directory's lock (refusing a directory another run holds), and write
    spec.toml, plan.json and the engine key into its (new or existing) run directory."""

    plan = planning.make_plan(spec)
    run_dir = Path(plan.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    held = lock.acquire(run_dir, "miles run")
    enginekey.ensure(run_dir, spec)
    rundir.write_atomic(run_dir / rundir.SPEC, spec_to_toml(spec))
    rundir.write_atomic(run_dir / rundir.PLAN, planning.to_json(plan))
    (run_dir / rundir.LOGS).mkdir(exist_ok=True)
    (run_dir / rundir.CONTROL).mkdir(exist_ok=True)
    # Control files belong to one launch: a preempt flag of the previous attempt must not stop
    # this one at once, nor a `done` of a self-test end it (the loop writes `done` again when complete).
    (run_dir / rundir.PREEMPT).unlink(missing_ok=True)
    (run_dir / rundir.DONE).unlink(missing_ok=True)
    return run_dir, plan, held


def local_trainer_gpus(plan: Plan) -> tuple[int, ...]:
    """The GPUs of the trainer ranks when a split plan runs on this one machine: those after the engines'.

    On a cluster the two components of a split job sit on different nodes, and both count their GPUs from 0;
    here they share one machine, so the engines keep the plan's GPUs and the trainers take the next ones.
    Colocated and CPU plans need nothing (empty).
    """
    if plan.mode != "split" or plan.device != "gpu":
        return ()
    multi = [c.role for c in plan.components if c.nodes > 1]
    if multi:
        raise UserError(
            f"`miles run` runs a split plan on this one machine, but its {' and '.join(multi)} span "
            "several nodes; set cluster.actor_num_nodes = 1 and cluster.rollout_num_nodes = 1, "
            "or submit it with `miles submit`"
        )
    first = 1 + max(g for e in plan.engines for g in e.gpus)
    return tuple(range(first, first + plan.mesh.world_size))


def rank_envs(
    run_dir: Path, num_trainers: int, num_engines: int, base: dict[str, str], trainer_gpus: Sequence[int] = ()
) -> list[tuple[str, str, dict[str, str]]]:
    """(name, role, environment) of every process: engines first, then trainer ranks.

    ``trainer_gpus`` (split mode on one machine): the GPUs the trainer ranks see
    (``CUDA_VISIBLE_DEVICES``), so that they do not share the engines' GPUs.
    """
    ports = free_ports(2 + num_engines)
    common = dict(base)
    common.update(
        {
            "MILES_RUN_DIR": str(run_dir),
            "MILES_LAUNCH_ID": f"local-{uuid.uuid4().hex[:12]}",
            "MILES_MASTER_ADDR": "127.0.0.1",
            "MILES_MASTER_PORT": str(ports[0]),
            "MILES_WEIGHT_UPDATE_PORT": str(ports[1]),
            "MILES_ENGINE_HOST": "127.0.0.1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(ports[0]),
            "PYTHONUNBUFFERED": "1",
        }
    )
    nprocs = num_trainers + num_engines
    common.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(nprocs, 1))))
    out = []
    for i in range(num_engines):
        env = dict(
            common, RANK=str(i), WORLD_SIZE=str(num_engines), LOCAL_RANK=str(i), MILES_ENGINE_PORT=str(ports[2 + i])
        )
        out.append((f"engine {i}", "engine", env))
    for r in range(num_trainers):
        env = dict(common, RANK=str(r), WORLD_SIZE=str(num_trainers), LOCAL_RANK=str(r))
        if trainer_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, trainer_gpus))
        out.append((f"trainer {r}", "trainer", env))
    return out


class LocalRun:
    """The launcher's state: its ranks and how the run is going."""

    def __init__(self, run_dir: Path, out: IO[str], held: lock.RunDirLock | None = None) -> None:
        self.run_dir = run_dir
        self.held = held
        self.printer = Console(out, run_dir / rundir.LOGS)
        self.printer.failed_ranks = lambda: [r.name for r in self.ranks if r.proc.poll() not in (None, 0)]
        self.ranks: list[Rank] = []
        self.stop_signal: int | None = None
        self.stop_at: float | None = None

    def start(self, procs: list[tuple[str, str, dict[str, str]]], python: str = sys.executable) -> None:
        # The ranks inherit the lock (it outlives the launcher until the last rank is gone) and die with the
        # launcher; they start in sessions of their own, so Ctrl-C reaches the launcher only (it forwards).
        keep = (self.held.fd,) if self.held is not None and self.held.fd >= 0 else ()
        for name, role, env in procs:
            p = subprocess.Popen(
                [python, "-m", "miles.launch.task", "--run-dir", str(self.run_dir), "--role", role],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=keep,
                preexec_fn=orphans.die_with_parent(),
            )
            rank = Rank(name=name, proc=p, role=role)
            assert p.stdout is not None
            rank.pump = threading.Thread(target=self.printer.pump, args=(name, p.stdout), daemon=True)
            rank.pump.start()
            self.ranks.append(rank)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_signal is not None:
            self.printer.say(f"second {signal.Signals(signum).name}: stopping every rank now")
            self.stop_at = time.monotonic()
            return
        self.stop_signal = signum
        grace = float(os.environ.get("MILES_GRACE_S", "120"))
        self.stop_at = time.monotonic() + grace
        rundir.write_atomic(self.run_dir / rundir.PREEMPT, f"{signal.Signals(signum).name}\n")
        self.printer.say(
            f"{signal.Signals(signum).name}: asked the ranks to checkpoint and stop "
            f"({self.run_dir / rundir.PREEMPT}); waiting up to {grace:g} s (Ctrl-C again: stop now)"
        )

    def terminate(self, ranks: list[Rank], why: str) -> None:
        live = [r for r in ranks if r.proc.poll() is None]
        if not live:
            return
        if self.printer.cause is None:
            self.printer.say(f"stopping {', '.join(r.name for r in live)} ({why})")
        for r in live:
            _signal_group(r.proc, signal.SIGTERM)
        end = time.monotonic() + _TERM_GRACE_S
        while time.monotonic() < end and any(r.proc.poll() is None for r in live):
            time.sleep(_POLL_S)
        for r in live:
            if r.proc.poll() is None:
                _signal_group(r.proc, signal.SIGKILL)
                r.proc.wait()

    def wait(self) -> int:
        """Supervise until the trainers are done or a rank fails; returns the exit code of ``miles run``."""
        trainers = [r for r in self.ranks if r.role == "trainer"]
        engines = [r for r in self.ranks if r.role == "engine"]
        while True:
            for r in self.ranks:
                if r.exit_code is None and r.proc.poll() is not None:
                    r.exit_code = r.proc.returncode
                    if r.exit_code != 0 or (r.role == "engine" and any(t.proc.poll() is None for t in trainers)):
                        return self._fail(r)
            if all(t.exit_code is not None for t in trainers):
                self.terminate(engines, "the trainers are done")
                self._drain()
                if self.stop_signal is not None and not (self.run_dir / rundir.DONE).exists():
                    self.printer.say(f"stopped; start `miles run` again on {self.run_dir} to resume")
                    return 128 + self.stop_signal
                return 0
            if self.stop_at is not None and time.monotonic() >= self.stop_at:
                self.terminate(self.ranks, "grace period over")
                self._drain()
                return 128 + (self.stop_signal or signal.SIGTERM)
            time.sleep(_POLL_S)

    def _fail(self, first: Rank) -> int:
        """End the run after ``first`` exited while it was going: the cause's story first, the rest in a line."""
        cause = next((r for r in self.ranks if r.name == self.printer.blame(first.name)), first)
        if cause.exit_code is None:  # it reported its failure and is on its way out
            try:
                cause.exit_code = cause.proc.wait(timeout=_TERM_GRACE_S)
            except subprocess.TimeoutExpired:
                cause.exit_code = 1
        self.printer.say(
            f"{cause.name} (pid {cause.proc.pid}) {_describe(cause.exit_code)} while the run was going; ending the run"
        )
        self.terminate(self.ranks, f"{cause.name} failed")
        self._drain()
        others = [r.name for r in self.ranks if r is not cause]
        if others:
            where = self.printer.log_dir or self.run_dir
            self.printer.say(f"{', '.join(others)} ended because {cause.name} failed (their output: {where}/)")
        return cause.exit_code if cause.exit_code > 0 else 1

    def _drain(self) -> None:
        for r in self.ranks:
            if r.pump is not None:
                r.pump.join(timeout=5)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the rank's process group (the rank and anything it started), by the rank's own pid."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _describe(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def run(spec: Spec, out: IO[str] | None = None) -> int:
    """``miles run``: plan, write the run directory, start engines and trainers here, supervise."""
    run_dir, plan, held = prepare_run_dir(spec)

    assert isinstance(plan, Plan)
    trainer_gpus = local_trainer_gpus(plan)
    if plan.device == "gpu":
        import torch

        needed = plan.mesh.world_size + (trainer_gpus[0] if trainer_gpus else 0)
        if not torch.cuda.is_available() or torch.cuda.device_count() < needed:
            raise UserError(
                f"the plan needs {needed} GPUs on this machine but torch sees "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; set "
                'cluster.gpus_per_node = 0 (and cluster.device = "cpu") to run on CPUs'
            )
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = rank_envs(run_dir, plan.mesh.world_size, len(plan.engines), base, trainer_gpus)
    launcher = LocalRun(run_dir, out or sys.stdout, held)
    launcher.printer.say(
        f"{plan.mesh.world_size} trainer rank(s) and {len(plan.engines)} engine(s) on this machine; "
        f"run directory {run_dir}"
    )
    previous = {s: signal.signal(s, launcher.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        launcher.start(procs)
        return launcher.wait()
    finally:
        launcher.terminate(launcher.ranks, "the launcher is exiting")
        for s, h in previous.items():
            signal.signal(s, h)
        held.release()
