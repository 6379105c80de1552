"""An engine rank: start the engine server, announce it once healthy, serve until stopped.

The announcement (``run_dir/engines/engine-<i>.json``) is written only after
``/health_generate`` answers over the network, so the driver never talks to an
engine that is still loading. The port is the plan's unless it is taken (on the
local cluster every virtual node is 127.0.0.1; on real nodes another process may
hold it): then a free one is used, and the announcement says which.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.error
import urllib.request

from miles.launch import rundir
from miles.launch.environment import TaskContext
from miles.spec.tables import Spec

_HEALTH_POLL_S = 0.25


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


def _announce_when_healthy(ctx: TaskContext, port: int, deadline_s: float, stop: threading.Event) -> None:
    url = f"http://{ctx.engine_host}:{port}"
    end = time.monotonic() + deadline_s
    while not stop.is_set() and time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health_generate", timeout=30) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(_HEALTH_POLL_S)
    else:
        if not stop.is_set():
            print(f"[{ctx.name} on {ctx.node_name}] not healthy after {deadline_s:.0f} s; not announced", flush=True)
        return
    assert ctx.engine_index is not None
    rundir.announce_engine(ctx.run_dir, rundir.Announcement(index=ctx.engine_index, url=url, host=ctx.engine_host,
                                                            port=port, pid=os.getpid(), launch_id=ctx.launch_id))
    print(f"[{ctx.name} on {ctx.node_name}] healthy at {url}; announced", flush=True)


def serve_engine(spec: Spec, ctx: TaskContext, deadline_s: float = 900.0) -> None:
    """Serve engine ``ctx.engine_index`` until SIGTERM/SIGINT (blocking)."""
    if spec.rollout.engine != "embedded":
        from miles.errors import UserError

        raise UserError(f"rollout.engine = {spec.rollout.engine!r}: only the embedded engine is launched by "
                        "miles.launch.task so far; SGLang engines are started by the sglang launcher")
    from miles.rollout.server import serve
    from miles.session import resolve_model_dir

    assert ctx.engine_index is not None and ctx.engine_port is not None
    model_dir = resolve_model_dir(spec, ctx.run_dir)
    port = pick_port(ctx.engine_port)
    stop = threading.Event()
    watcher = threading.Thread(target=_announce_when_healthy, args=(ctx, port, deadline_s, stop), daemon=True)
    watcher.start()
    try:
        serve(model_dir, host="0.0.0.0", port=port, device=ctx.device, dtype=spec.model.dtype,
              seed=spec.rollout.rollout_seed + ctx.engine_index, trust_remote_code=spec.model.trust_remote_code)
    finally:
        stop.set()
