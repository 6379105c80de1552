"""An engine rank: start the engine server, announce it once healthy, serve until stopped.

The announcement (``run_dir/engines/engine-<i>.json``) is written only after
``/health_generate`` answers, so the driver never talks to an engine that is
still loading. The port is the plan's unless it is taken (on the local cluster
every virtual node is 127.0.0.1; on real nodes another process may hold it):
then a free one is used, and the announcement says which.

* embedded engine: served in this process (``miles.rollout.server.serve``);
* SGLang: ``python -m sglang.launch_server`` started through the rollout
  launcher (``miles.rollout.sglang_launcher``: the same argv, GPUs and health
  check as everywhere else), supervised here; SIGTERM/SIGINT stop it.

``MILES_ENGINE_API_KEY``, when set, protects the engines; the driver sends it.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

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


def _announce(ctx: TaskContext, port: int) -> None:
    assert ctx.engine_index is not None
    url = f"http://{ctx.engine_host}:{port}"
    rundir.announce_engine(ctx.run_dir, rundir.Announcement(index=ctx.engine_index, url=url, host=ctx.engine_host,
                                                            port=port, pid=os.getpid(), launch_id=ctx.launch_id))
    print(f"[{ctx.name} on {ctx.node_name}] healthy at {url}; announced", flush=True)


def _announce_when_healthy(ctx: TaskContext, port: int, api_key: str | None, deadline_s: float,
                           stop: threading.Event) -> None:
    from miles.rollout.sglang_launcher import health_ok

    end = time.monotonic() + deadline_s
    while not stop.is_set():
        if health_ok(f"http://127.0.0.1:{port}", api_key, timeout=30):
            _announce(ctx, port)
            return
        if time.monotonic() >= end:
            print(f"[{ctx.name} on {ctx.node_name}] not healthy after {deadline_s:.0f} s; not announced", flush=True)
            return
        time.sleep(_HEALTH_POLL_S)


def _serve_embedded(spec: Spec, ctx: TaskContext, model_dir: str, port: int, api_key: str | None,
                    deadline_s: float) -> None:
    from miles.rollout.server import serve

    assert ctx.engine_index is not None
    stop = threading.Event()
    watcher = threading.Thread(target=_announce_when_healthy, args=(ctx, port, api_key, deadline_s, stop), daemon=True)
    watcher.start()
    try:
        serve(model_dir, host="0.0.0.0", port=port, device=ctx.device, dtype=spec.model.dtype,
              seed=spec.rollout.rollout_seed + ctx.engine_index, api_key=api_key,
              trust_remote_code=spec.model.trust_remote_code)
    finally:
        stop.set()


def _serve_sglang(spec: Spec, ctx: TaskContext, model_dir: str, port: int, api_key: str | None,
                  deadline_s: float) -> None:
    from miles.rollout.sglang_launcher import EngineProcess, engine_launch

    assert ctx.engine_index is not None
    launch = engine_launch(spec, index=ctx.engine_index, model_path=model_dir, host="0.0.0.0", port=port,
                           api_key=api_key, log_dir=ctx.run_dir / rundir.LOGS, gpus=ctx.engine_gpus,
                           device=ctx.device, tp_size=spec.sglang.rollout_num_gpus_per_engine,
                           nccl_port=ctx.engine_nccl_port, kind="sglang")
    proc = EngineProcess(launch)
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    print(f"[{ctx.name} on {ctx.node_name}] starting SGLang: {' '.join(launch.argv)} (log {launch.log_path})",
          flush=True)
    proc.start()
    try:
        proc.wait_healthy(deadline_s)
        _announce(ctx, port)
        while not stopping.wait(0.5):
            if not proc.alive():
                raise RuntimeError(f"the SGLang server of {ctx.name} exited (code {proc.proc.returncode if proc.proc else None}); "
                                   f"its log ends:\n{proc.log_tail()}")
    finally:
        proc.stop()


def serve_engine(spec: Spec, ctx: TaskContext, deadline_s: float = 900.0) -> None:
    """Serve engine ``ctx.engine_index`` until SIGTERM/SIGINT (blocking)."""
    from miles.session import resolve_model_dir

    assert ctx.engine_index is not None and ctx.engine_port is not None
    model_dir = resolve_model_dir(spec, ctx.run_dir)
    port = pick_port(ctx.engine_port)
    api_key = os.environ.get("MILES_ENGINE_API_KEY") or None
    if spec.rollout.engine == "sglang":
        _serve_sglang(spec, ctx, model_dir, port, api_key, deadline_s)
    else:
        _serve_embedded(spec, ctx, model_dir, port, api_key, deadline_s)
