"""The entry every rank runs: ``python -m miles.launch.task --run-dir DIR [--role trainer|engine]``.

srun (``miles submit``), ``miles run`` and mpirun all start this same module, so a
job on a cluster and a run on a laptop take one code path. It works out the
rank's :class:`~miles.job.environment.TaskContext` from the environment and
``run_dir/plan.json``, then:

* engine: starts the engine server, announces ``run_dir/engines/engine-<i>.json``
  once ``/health_generate`` answers, and serves until it is stopped;
* trainer: forms the trainer world with ``torch.distributed`` (gloo on CPUs,
  NCCL on GPUs, with a timeout so a lost peer cannot hang it forever) and runs
  ``miles.loop.run_trainer``; rank 0 (the driver) waits for the engines.

``--selftest`` replaces the model work by the by-value checks of
:mod:`miles.launch.selftest`: what an admin runs to check a site.

The run's engine key (``run_dir/engine.key``, :mod:`miles.job.enginekey`) is
put into ``MILES_ENGINE_API_KEY`` for the engine servers, the router and the
driver. A rank whose parent (``miles run``, srun's step daemon) is gone ends
itself and what it started (:mod:`miles.job.orphans`).

A failing rank prints one line naming itself and its node before it exits
non-zero; srun's ``--kill-on-bad-exit=1`` and the batch shell's ``wait -n`` then
end the whole job.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import traceback
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from miles.errors import UserError
from miles.job import enginekey, rundir
from miles.job.environment import Layout, Role, TaskContext, detect_launcher, task_context
from miles.job.orphans import watch_parent
from miles.launch import selftest
from miles.launch.engine_host import serve_engine
from miles.spec import load_spec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m miles.launch.task", description="Run one rank of a miles run (trainer or engine)."
    )
    p.add_argument(
        "--run-dir",
        default=os.environ.get("MILES_RUN_DIR"),
        help="the run directory holding spec.toml and plan.json (default: $MILES_RUN_DIR)",
    )
    p.add_argument(
        "--role",
        choices=["trainer", "engine"],
        default=None,
        help="this rank's role; omitted, it is derived from the rank when one launch starts "
        "engines and trainers together (engines first)",
    )
    p.add_argument(
        "--selftest",
        action="store_true",
        default=os.environ.get("MILES_SELFTEST", "") not in ("", "0"),
        help="check the launch path by value (all-reduce, engine HTTP, weight-update broadcast) "
        "instead of training (also: MILES_SELFTEST=1 in the environment of `miles submit`)",
    )
    p.add_argument(
        "--hold",
        type=float,
        default=float(os.environ.get("MILES_SELFTEST_HOLD", "0")),
        help="selftest: stay alive this many seconds after the checks ($MILES_SELFTEST_HOLD)",
    )
    p.add_argument(
        "--engine-deadline",
        type=float,
        default=float(os.environ.get("MILES_ENGINE_DEADLINE", "900")),
        help="seconds the driver waits for every engine to announce itself (default 900, $MILES_ENGINE_DEADLINE)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("MILES_DIST_TIMEOUT", "1800")),
        help="torch.distributed timeout in seconds (default 1800, $MILES_DIST_TIMEOUT)",
    )
    return p


def mpi_bootstrap(env: Mapping[str, str]) -> tuple[list[str] | None, str | None]:
    """Under mpirun, with mpi4py installed: every rank's host name and a launch id chosen by rank 0.

    MPI says nothing about where the ranks run; the host list lets every rank find
    trainer rank 0 (which, in one MPMD launch of engines + trainers, is not MPI rank 0).
    """
    if detect_launcher(env) != "mpi":
        return None, None
    try:
        from mpi4py import MPI  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None, None
    comm = MPI.COMM_WORLD
    hosts: list[str] = comm.allgather(socket.gethostname())
    launch: str = comm.bcast(uuid.uuid4().hex[:12] if comm.Get_rank() == 0 else None, root=0)
    return hosts, f"mpi-{launch}"


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)


def load_context(run_dir: Path, role: Role | None, env: Mapping[str, str]) -> tuple[TaskContext, dict[str, Any]]:
    plan = rundir.read_json(run_dir / rundir.PLAN)
    layout = Layout.from_plan(plan)
    pref: Literal["auto", "cpu"] = "cpu" if plan.get("device") == "cpu" else "auto"
    hosts, launch_id = mpi_bootstrap(env)
    rank0_host = None
    if hosts and "MASTER_ADDR" not in env and "MILES_MASTER_ADDR" not in env:
        both = layout.trainer_world_size + layout.num_engines
        rank0_host = hosts[layout.num_engines] if len(hosts) == both and layout.num_engines else hosts[0]
    if launch_id and "MILES_LAUNCH_ID" not in env:
        env = {**env, "MILES_LAUNCH_ID": launch_id}
    ctx = task_context(
        env,
        layout,
        role=role,
        run_dir=run_dir,
        cuda_available=pref != "cpu" and _cuda_available(),
        device_pref=pref,
        rank0_host=rank0_host,
    )
    return ctx, plan


def _init_trainer_world(ctx: TaskContext, timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    if ctx.device == "cuda":
        torch.cuda.set_device(ctx.local_rank % torch.cuda.device_count())
    dist.init_process_group(
        ctx.backend,
        init_method=f"tcp://{ctx.master_addr}:{ctx.master_port}",
        rank=ctx.rank,
        world_size=ctx.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def run(ctx: TaskContext, args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Run this rank's part; returns its exit code."""
    if args.selftest:
        if ctx.role == "trainer":
            selftest.trainer(
                ctx, env, hold_s=args.hold, engine_deadline_s=args.engine_deadline, timeout_s=min(args.timeout, 120.0)
            )
        else:
            selftest.engine(ctx, env, hold_s=args.hold, timeout_s=max(args.engine_deadline, 120.0))
        return 0

    spec = load_spec(str(ctx.run_dir / rundir.SPEC), [])

    enginekey.export(Path(ctx.run_dir), spec, os.environ)  # engines, router and driver read it from there
    if ctx.role == "engine":
        serve_engine(spec, ctx, deadline_s=args.engine_deadline)
        return 0
    _init_trainer_world(ctx, args.timeout)

    from miles.loop import run_trainer  # deferred: torch and the training stack; engine ranks never import them

    return int(run_trainer(spec, ctx) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # transformers' per-file progress bars would flood every rank's log (and the
    # engines it starts inherit this); a user can set it to 0 to see them.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    watch_parent()  # a rank whose launcher is gone ends, with whatever it started
    env = dict(os.environ)
    who = f"{args.role or 'task'} (pid {os.getpid()}) on {env.get('SLURMD_NODENAME') or socket.gethostname()}"
    try:
        if not args.run_dir:
            raise UserError("no run directory: pass --run-dir or set MILES_RUN_DIR")
        ctx, _ = load_context(Path(args.run_dir), args.role, env)
        who = f"{ctx.name} (pid {os.getpid()}) on {ctx.node_name}"
        return run(ctx, args, env)
    except SystemExit as e:  # sys.exit() inside the rank (e.g. after a checkpoint-and-stop): keep its code
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code:
            print(f"miles task {who} exited with code {code}", file=sys.stderr, flush=True)
        return code
    except UserError as e:
        print(f"miles task {who} FAILED: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"miles task {who} interrupted", file=sys.stderr, flush=True)
        return 130
    except BaseException as e:
        traceback.print_exc()
        print(f"miles task {who} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
