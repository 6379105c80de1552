"""An engine rank: start the engine server, announce it once healthy, restart it if it dies, serve until stopped.

There is one engine-hosting path for both engine kinds:
:func:`miles.rollout.sglang_launcher.serve_engine_task`. It starts the server
as a child process (``python -m sglang.launch_server``, or ``python -m
miles.rollout.server`` for the embedded engine) with the engine's GPUs only
(``CUDA_VISIBLE_DEVICES`` from the plan), waits for ``/health_generate``,
announces it (``run_dir/engines/engine-<i>.json``, with the server's pid),
restarts it if it exits and announces it again (new pid), and stops it on
SIGTERM/SIGINT. The driver re-forms the weight-update group with an engine
whose announcement changed (:class:`miles.session_driver.EngineFleet`).

The port is the plan's unless it is taken (on the local cluster every virtual
node is 127.0.0.1; on real nodes another process may hold it): then a free one
is used, and the announcement says which. ``MILES_ENGINE_API_KEY``, when set,
protects the engines; the driver sends it. SGLang runs under
``MILES_SGLANG_PYTHON`` when set (SGLang usually has an environment of its
own), else the interpreter running miles.
"""

from __future__ import annotations

import socket

from miles.launch.environment import TaskContext
from miles.spec.tables import Spec


def pick_port(preferred: int) -> int:
    """``preferred`` when it can be bound on every interface now, else a free port from the OS."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free TCP port")


def serve_engine(spec: Spec, ctx: TaskContext, deadline_s: float = 900.0) -> None:
    """Serve engine ``ctx.engine_index`` until SIGTERM/SIGINT (blocking); see the module docstring."""
    from miles.rollout.sglang_launcher import serve_engine_task

    serve_engine_task(spec, ctx, deadline_s=deadline_s)
