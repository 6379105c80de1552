"""``miles.launch.task --selftest``: check a site's launch path without a model.

What an admin runs (through ``miles submit`` with ``--set`` of a tiny spec, or by
hand with srun/mpirun) to see whether miles can work on a cluster, and what the
integration tests run on the local Slurm cluster. Every check is by value:

1. trainer ranks form their world (gloo or NCCL) and all-reduce ``rank + 1``;
   the sum must be ``W (W + 1) / 2``;
2. each engine serves HTTP and announces itself in ``run_dir/engines``; the
   driver (trainer rank 0) waits for all of them and calls ``/health_generate``;
3. the driver and the engines form the weight-update group and the driver
   broadcasts a tensor that depends on the launch; each engine checks it and
   the group all-reduces an "ok" count that must equal the number of engines.

Each rank writes ``run_dir/selftest/<role>-<rank>.json`` with what it saw (its
:class:`TaskContext`, the Slurm variables, the values), which the tests compare
with the plan. In the self-test each engine holds one rank of the weight-update
group (ranks ``1..E``), whatever its TP: it checks the path, not the shard layout.

``--hold S`` keeps every rank alive for S more seconds, all-reducing every 0.5 s,
so that a test (or an admin) can kill one rank and watch the job end.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from miles.job import rundir
from miles.job.environment import TaskContext

SELFTEST = "selftest"
_ENV_KEYS = (
    "SLURM_JOB_ID",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURMD_NODENAME",
    "SLURM_STEP_NODELIST",
    "SLURM_JOB_NODELIST",
    "SLURM_HET_SIZE",
    "SLURM_JOB_NODELIST_HET_GROUP_0",
    "SLURM_JOB_NODELIST_HET_GROUP_1",
    "SLURM_RESTART_COUNT",
    "CUDA_VISIBLE_DEVICES",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_RANK",
)


def expected_broadcast(launch_id: str) -> list[float]:
    """The tensor the driver broadcasts: depends on the launch so a stale value cannot pass."""
    seed = sum(launch_id.encode()) % 997
    return [float(seed + i) for i in range(8)]


def _report(ctx: TaskContext, env: Mapping[str, str], **values: Any) -> None:
    data = {
        "context": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(ctx).items()},
        "env": {k: env[k] for k in _ENV_KEYS if k in env},
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        **values,
    }
    rundir.write_json(ctx.run_dir / SELFTEST / f"{ctx.role}-{ctx.rank}.json", data)


def _log(ctx: TaskContext, msg: str) -> None:
    print(f"[{ctx.name} on {ctx.node_name}] {msg}", flush=True)


def _weight_update_group(ctx: TaskContext, group_rank: int, world: int, timeout_s: float) -> Any:
    """A standalone gloo group of the driver and the engines (the engines are not in the trainer world)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(ctx.weight_update_addr, ctx.weight_update_port, world, group_rank == 0, timeout=timeout)
    return dist.ProcessGroupGloo(dist.PrefixStore(f"selftest-wu-{ctx.launch_id}", store), group_rank, world, timeout)


def trainer(
    ctx: TaskContext, env: Mapping[str, str], *, hold_s: float, engine_deadline_s: float, timeout_s: float
) -> None:
    import torch
    import torch.distributed as dist

    t0 = time.monotonic()
    dist.init_process_group(
        ctx.backend,
        init_method=f"tcp://{ctx.master_addr}:{ctx.master_port}",
        rank=ctx.rank,
        world_size=ctx.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    device = torch.device("cuda", torch.cuda.current_device()) if ctx.device == "cuda" else torch.device("cpu")
    x = torch.tensor([float(ctx.rank + 1)], device=device)
    dist.all_reduce(x)
    want = ctx.world_size * (ctx.world_size + 1) / 2
    if x.item() != want:
        raise RuntimeError(f"all_reduce of rank+1 over {ctx.world_size} trainers gave {x.item()}, expected {want}")
    _log(
        ctx,
        f"trainer world of {ctx.world_size} formed over {ctx.backend} at "
        f"{ctx.master_addr}:{ctx.master_port}; all_reduce = {x.item():g} (ok) in {time.monotonic() - t0:.1f} s",
    )
    values: dict[str, Any] = {"all_reduce": x.item(), "expected_all_reduce": want}
    wu = None
    if ctx.is_driver and ctx.num_engines:
        found = rundir.wait_for_engines(ctx.run_dir, ctx.num_engines, ctx.launch_id, engine_deadline_s)
        health = {}
        for a in found:
            with urllib.request.urlopen(f"{a.url}/health_generate", timeout=10) as r:
                health[a.index] = r.status
        _log(ctx, f"reached all {len(found)} engines: " + ", ".join(a.url for a in found))
        world = 1 + ctx.num_engines
        wu = _weight_update_group(ctx, 0, world, timeout_s + hold_s)
        payload = torch.tensor(expected_broadcast(ctx.launch_id))
        wu.broadcast(payload, 0).wait()
        ok = torch.tensor([0.0])
        wu.allreduce([ok]).wait()
        if ok.item() != ctx.num_engines:
            raise RuntimeError(f"only {ok.item():g} of {ctx.num_engines} engines received the broadcast intact")
        _log(
            ctx,
            f"weight-update group of {world} at {ctx.weight_update_addr}:{ctx.weight_update_port}: "
            f"broadcast checked by all {ctx.num_engines} engines",
        )
        values.update(
            engine_urls=[a.url for a in found], engine_health=health, engines_ok=ok.item(), broadcast=payload.tolist()
        )
    _report(ctx, env, **values, phase="checked")

    def beat() -> bool:
        flag = torch.tensor([1.0 if rundir.preempt_requested(ctx.run_dir) else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    preempted = _hold(ctx, hold_s, beat)
    dist.barrier()
    if wu is not None:
        wu.barrier().wait()  # releases the engines
    _report(ctx, env, **values, phase="preempted" if preempted else "done")
    if ctx.is_driver and not preempted:
        rundir.write_atomic(ctx.run_dir / rundir.DONE, "selftest\n")  # complete: the batch shell must not requeue
    dist.destroy_process_group()
    _log(ctx, "stopped on request (control/preempt); all ranks agreed" if preempted else "selftest passed")


def _hold(ctx: TaskContext, hold_s: float, beat: Any) -> bool:
    """Stay alive for ``hold_s`` seconds, all-reducing the preempt flag every 0.5 s.

    A dead peer makes the collective fail (the rank exits non-zero); a preempt
    request (``control/preempt``) seen by any rank stops every rank at the same
    beat, as the training loop does at its step boundaries. Returns whether it
    stopped on request.
    """
    if hold_s <= 0:
        return False
    _log(ctx, f"holding for {hold_s:g} s")
    end = time.monotonic() + hold_s
    while time.monotonic() < end:
        if beat():
            return True
        time.sleep(0.5)
    return False


class _Health(BaseHTTPRequestHandler):
    ctx_json = b"{}"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path in ("/health", "/health_generate"):
            body = b"ok"
        elif self.path == "/selftest":
            body = self.ctx_json
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def bind_server(port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """Bind the plan's port, or any free one when it is taken (the announcement carries the real port).

    On the local cluster every virtual node is 127.0.0.1, so engines of different
    nodes that the plan gives the same port would collide; on real clusters an
    unrelated process may hold the port.
    """
    try:
        return ThreadingHTTPServer(("0.0.0.0", port), handler)
    except OSError:
        return ThreadingHTTPServer(("0.0.0.0", 0), handler)


def engine(ctx: TaskContext, env: Mapping[str, str], *, hold_s: float, timeout_s: float) -> None:
    import torch

    handler = type("Handler", (_Health,), {"ctx_json": json.dumps({"engine": ctx.engine_index}).encode()})
    server = bind_server(ctx.engine_port or 0, handler)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://{ctx.engine_host}:{port}"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health_generate", timeout=10) as r:
        assert r.status == 200
    assert ctx.engine_index is not None
    rundir.announce_engine(
        ctx.run_dir,
        rundir.Announcement(
            index=ctx.engine_index, url=url, host=ctx.engine_host, port=port, pid=os.getpid(), launch_id=ctx.launch_id
        ),
    )
    _log(ctx, f"serving {url}; announced")
    wu = _weight_update_group(ctx, 1 + ctx.engine_index, 1 + ctx.num_engines, timeout_s + hold_s)
    got = torch.zeros(8)
    wu.broadcast(got, 0).wait()
    intact = got.tolist() == expected_broadcast(ctx.launch_id)
    wu.allreduce([torch.tensor([1.0 if intact else 0.0])]).wait()
    if not intact:
        raise RuntimeError(f"weight-update broadcast arrived as {got.tolist()}")
    _log(ctx, "received the driver's broadcast intact")
    _report(ctx, env, broadcast=got.tolist(), url=url, phase="checked")
    wu.barrier().wait()  # the driver's last act: the trainers are done
    _report(ctx, env, broadcast=got.tolist(), url=url, phase="done")
    if ctx.launcher == "mpi":  # mpirun waits for every rank and stops none: end with the trainers
        server.shutdown()
        _log(ctx, "selftest passed")
        return
    _log(ctx, "selftest passed; serving until stopped")
    # Like a real engine, serve until the launcher stops us (the batch shell once the
    # trainers step has ended, `miles run` once the trainers have exited): an engine
    # step that ends on its own while trainers run is an error to the batch shell.
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    while not stopped.wait(0.5):
        pass
    server.shutdown()
