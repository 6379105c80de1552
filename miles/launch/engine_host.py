"""An engine rank: start the engine server, announce it once healthy, restart it if it dies, serve until stopped.

There is one engine-hosting path for both engine kinds:
:func:`serve_engine`. It starts the server
as a child process (``python -m sglang.launch_server``, or ``python -m
miles.engine.server`` for the embedded engine) with the engine's GPUs only
(``CUDA_VISIBLE_DEVICES`` from the plan), waits for ``/health_generate``,
announces it (``run_dir/engines/engine-<i>.json``, with the server's pid),
restarts it if it exits and announces it again (new pid), and stops it on
SIGTERM/SIGINT. The driver re-forms the weight-update group with an engine
whose announcement changed (:class:`miles.rollout.fleet.EngineFleet`).

The port is the plan's unless it is taken (on the local cluster every virtual
node is 127.0.0.1; on real nodes another process may hold it): then a free one
is used, and the announcement says which. ``MILES_ENGINE_API_KEY``, when set,
protects the engines; the driver sends it. SGLang runs under
``MILES_SGLANG_PYTHON`` when set (SGLang usually has an environment of its
own), else the interpreter running miles.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import replace
from pathlib import Path

from miles.job import rundir
from miles.job.enginekey import redact
from miles.job.environment import TaskContext
from miles.job.ports import free_port
from miles.plan.engine_argv import KEY_ENV
from miles.sglang.launcher import (
    EngineKind,
    EngineLaunch,
    EngineProcess,
    EngineStartError,
    Supervisor,
    engine_launch,
    engine_python,
    start_engines,
)
from miles.spec.tables import Spec


def task_launch(
    spec: Spec, ctx: TaskContext, *, kind: EngineKind | None = None, python: str | None = None
) -> EngineLaunch:
    """The launch of the engine rank ``ctx``: the plan's HTTP and NCCL ports (each replaced by a free one when it is
    taken, e.g. by another run on the same machine), the plan's GPUs of this engine, the job's API key; bound on
    every interface and advertised at ``ctx.engine_host``."""
    assert ctx.engine_index is not None and ctx.engine_port is not None
    launch = engine_launch(
        spec,
        index=ctx.engine_index,
        model_path=rundir.model_dir_of(spec, ctx.run_dir),
        host="0.0.0.0",
        port=free_port(ctx.engine_port),
        api_key=os.environ.get(KEY_ENV) or None,
        log_dir=Path(ctx.run_dir) / rundir.LOGS,
        gpus=ctx.engine_gpus,
        device=ctx.device,
        tp_size=spec.sglang.rollout_num_gpus_per_engine,
        nccl_port=free_port(ctx.engine_nccl_port) if ctx.engine_nccl_port is not None else None,
        python=python or engine_python(kind or spec.rollout.engine),
        kind=kind,
    )
    return replace(launch, advertise_host=ctx.engine_host)


def serve_engine(
    spec: Spec,
    ctx: TaskContext,
    *,
    deadline_s: float = 900.0,
    kind: EngineKind | None = None,
    python: str | None = None,
) -> None:
    """The engine rank of a job (``miles.launch.task``): serve engine ``ctx.engine_index`` until SIGTERM.

    Starts the server (``[rollout] engine``, or ``kind``: the embedded engine stands
    in on the local cluster) on this node with the plan's GPUs of this engine only
    (``CUDA_VISIBLE_DEVICES``, for either kind, also when colocated with trainers),
    the job's API key (``MILES_ENGINE_API_KEY``) and SGLang's interpreter
    (``MILES_SGLANG_PYTHON``, else miles' own); announces it in the run
    directory once ``/health_generate`` answers, restarts it if it dies
    (re-announcing it with the new pid; the driver then re-forms the weight-update
    group with it), and stops it on SIGTERM/SIGINT. An engine that cannot be
    (re)started ends the task with its log tail, so the job fails fast.
    """
    launch = task_launch(spec, ctx, kind=kind, python=python)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def announce(eng: EngineProcess) -> None:
        assert eng.pid is not None
        rundir.announce_engine(
            Path(ctx.run_dir),
            rundir.Announcement(
                index=launch.index,
                url=launch.url,
                host=ctx.engine_host,
                port=launch.port,
                pid=eng.pid,
                launch_id=ctx.launch_id,
            ),
        )
        print(
            f"[engine {launch.index} on {ctx.node_name}] healthy at {launch.url} (start {eng.starts}, pid {eng.pid})",
            flush=True,
        )

    print(
        f"[engine {launch.index} on {ctx.node_name}] starting {launch.kind}: "
        f"{redact(' '.join(launch.argv), launch.api_key)} "
        f"(env {dict(launch.env)}, log {launch.log_path})",
        flush=True,
    )
    (engine,) = start_engines([launch], health_deadline_s=deadline_s)
    sup = Supervisor([engine], health_deadline_s=deadline_s, on_restart=announce)
    try:
        announce(engine)
        sup.start()
        while not stop.wait(1.0):
            if sup.failed:
                raise EngineStartError(next(iter(sup.failed.values())))
    finally:
        sup.stop()
        engine.stop(timeout_s=8)  # under `miles run`'s 10 s grace, after which this task is killed
