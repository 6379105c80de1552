"""``miles bench sync``: weight sync trainer -> engines against a raw broadcast of the same bytes.

What is measured is miles' real path end to end: :class:`~miles.transfer.sync.WeightSync`
on the sending side (pause, per-bucket ``/update_weights_from_distributed`` over
HTTP, flatten, ``dist.broadcast``, flush, continue) and the embedded engine
server on the receiving side (unflatten, :meth:`Engine.load_weights`), see
:mod:`miles.bench.receiver`. The reference is a raw ``dist.broadcast`` of the
same number of bytes over the same process group, between the same processes,
in the same run (:meth:`WeightSync.raw_broadcast`), so ``ratio`` = sync GB/s /
raw GB/s is meaningful on any machine: 1.0 is the link's limit.

Locally the benchmark starts the engines itself (``--engines N`` child
processes; on a machine with GPUs the sender takes ``cuda:0`` and engine ``i``
``cuda:i+1``, NCCL). Inside a Slurm job (``srun -n K miles bench sync --slurm ...``)
or under ``torchrun --nproc-per-node K ... --torchrun``, task 0 is the sender and
every other task an engine; they meet through files in ``--rendezvous`` (a
directory every task sees).

Both figures are taken after one untimed sync and one small untimed broadcast
(NCCL builds its communicator on the first collective of a group; a host pays
first-touch page faults on new buffers), and each is the best of ``--iters``
(medians are reported beside them).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from miles.bench.receiver import serve
from miles.bench.report import Report, machine, plot_sync, write_atomic
from miles.bench.shapes import GIB, PRESETS, load_config_dict, scale_layers, tensor_specs, with_layers
from miles.engine.core import DTYPES
from miles.errors import UserError
from miles.job.ports import free_port
from miles.transfer.sync import WeightSync, bench


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="miles bench sync", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--config", help="HF config.json (or its directory) giving the layer shapes")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a known model shape instead of --config")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--total-gb",
        type=float,
        default=None,
        help="repeat decoder layers until the weights are this many GiB (default: the model's own size)",
    )
    p.add_argument("--layers", type=int, default=None, help="set num_hidden_layers directly (overrides --total-gb)")
    p.add_argument(
        "--bucket-mb",
        type=float,
        nargs="+",
        default=[64.0, 256.0, 1024.0],
        help="bucket sizes in MiB to sweep (default: 64 256 1024)",
    )
    p.add_argument("--iters", type=int, default=3, help="syncs (and raw broadcasts) per bucket size; the best counts")
    p.add_argument("--warmup", type=int, default=1, help="untimed syncs before the timed ones, per bucket size")
    p.add_argument("--engines", type=int, default=1, help="engine processes to start locally (default 1)")
    p.add_argument("--device", default=None, help="sender device (default cuda:0 if CUDA is available, else cpu)")
    p.add_argument(
        "--engine-device",
        default=None,
        help="engine device (default: cuda:<i+1> for engine i on GPUs, else the sender's device)",
    )
    p.add_argument("--backend", choices=["gloo", "nccl"], default=None, help="default nccl on GPUs, gloo on CPUs")
    p.add_argument(
        "--slurm",
        action="store_true",
        help="inside a Slurm step: SLURM_PROCID 0 sends, every other task runs an engine",
    )
    p.add_argument(
        "--torchrun",
        action="store_true",
        help="under torchrun: RANK 0 sends, every other rank runs an engine (on cuda:$LOCAL_RANK)",
    )
    p.add_argument(
        "--rendezvous",
        default=None,
        help="directory where the tasks meet, seen by all of them (default: "
        "$SLURM_SUBMIT_DIR/.miles-bench-sync-$SLURM_JOB_ID.$SLURM_STEP_ID under Slurm, "
        "$TMPDIR/miles-bench-sync-$TORCHELASTIC_RUN_ID-$MASTER_PORT under torchrun: one host)",
    )
    p.add_argument(
        "--master-addr", default=None, help="address engines use to reach the sender (default: its hostname)"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for engines to start")
    p.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON to this file")
    p.add_argument("--plot", default=None, help="write a PNG of GB/s against bucket size to this file")
    return p


def model_config(a: argparse.Namespace) -> dict[str, Any]:

    data = load_config_dict(a.config, a.preset)
    if a.layers is not None:
        data = with_layers(data, a.layers)
    elif a.total_gb is not None:
        if a.total_gb <= 0:
            raise UserError(f"--total-gb must be positive, got {a.total_gb}")
        size = DTYPES[a.dtype].itemsize
        data = scale_layers(data, int(a.total_gb * GIB), size)
    return data


def random_weights(data: dict[str, Any], dtype: str, device: str, seed: int = 0) -> list[tuple[str, Any]]:
    """The actor's named tensors for ``data``: HF names and shapes, random values, on ``device``."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    return [
        (t.name, torch.randn(t.shape, generator=gen, device=device, dtype=DTYPES[dtype])) for t in tensor_specs(data)
    ]


def _receiver_cmd(
    config_path: Path,
    dtype: str,
    device: str,
    host: str,
    port: int,
    ready: Path,
    done: Path | None,
    announce: str | None = None,
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "miles.bench.receiver",
        "--config-json",
        str(config_path),
        "--dtype",
        dtype,
        "--device",
        device,
        "--host",
        host,
        "--port",
        str(port),
        "--ready-file",
        str(ready),
    ]
    if done is not None:
        cmd += ["--done-file", str(done)]
    if announce:
        cmd += ["--announce-host", announce]
    return cmd


def wait_for_urls(
    ready_files: list[Path], procs: list[subprocess.Popen] | None, logs: list[Path] | None, timeout_s: float
) -> list[str]:
    """URLs from the engines' ready files; raises with an engine's log tail if it dies or the deadline passes."""
    end = time.monotonic() + timeout_s
    while True:
        missing = [f for f in ready_files if not f.exists()]
        if not missing:
            urls = [f.read_text().strip() for f in ready_files]
            if procs is not None or all(_answers(u) for u in urls):  # a file left by an earlier run names a dead port
                return urls
        for i, p in enumerate(procs or []):
            if p.poll() is not None:
                tail = logs[i].read_text(errors="replace")[-3000:] if logs else ""
                raise RuntimeError(f"bench engine {i} exited with {p.returncode} before serving; log tail:\n{tail}")
        if time.monotonic() > end:
            raise TimeoutError(
                f"{len(missing)} bench engine(s) not ready after {timeout_s:.0f} s: "
                f"{', '.join(str(m) for m in missing)}"
            )
        time.sleep(0.2)


def _answers(url: str) -> bool:
    """Whether an engine serves at ``url`` (its /health answers)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def verify(urls: list[str], named: list[tuple[str, Any]], api_key: str | None = None) -> int:
    """Check that every engine holds the sender's bits after the last sync; returns how many tensors were compared.

    A fast sync of wrong bytes would be worthless, so the benchmark reads back some small
    tensors (norm weights, biases: read through ``/get_weights_by_name``, which turns a whole tensor
    into JSON) spread over the model, hence over buckets and offsets inside buckets.
    """
    import urllib.request

    import torch

    small = [(n, t) for n, t in named if t.numel() <= 1 << 14]
    if not small:
        return 0
    picks = {0, len(small) // 3, 2 * len(small) // 3, len(small) - 1}
    for url in urls:
        for i in sorted(picks):
            name, tensor = small[i]
            body = json.dumps({"name": name, "truncate_size": tensor.numel()}).encode()
            req = urllib.request.Request(
                url + "/get_weights_by_name", data=body, method="POST", headers={"Content-Type": "application/json"}
            )
            if api_key:
                req.add_header("Authorization", f"Bearer {api_key}")
            with urllib.request.urlopen(req, timeout=60) as resp:
                got = torch.tensor(json.loads(resp.read()), dtype=torch.float32).reshape(tensor.shape)
            if not torch.equal(got, tensor.detach().to("cpu", torch.float32)):
                raise RuntimeError(f"engine {url} holds different values for {name} after the sync: the sync is broken")
    return len(picks) * len(urls)


def measure(
    a: argparse.Namespace,
    data: dict[str, Any],
    urls: list[str],
    device: str,
    backend: str,
    master_addr: str,
    engine_devices: list[str] | None = None,
) -> Report:
    """Sender side: sync the random weights at every bucket size, each against a raw broadcast."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))  # NCCL binds the group to the current GPU
    named = random_weights(data, a.dtype, device)
    total = sum(t.numel() * t.element_size() for _, t in named)
    sync = WeightSync(
        urls,
        master_address=master_addr,
        master_port=free_port(),
        backend=backend,
        bucket_bytes=int(a.bucket_mb[0] * (1 << 20)),
        device=device,
        timeout_s=a.timeout,
    )
    report = Report(
        "sync",
        settings={
            "model_type": data.get("model_type"),
            "layers": data.get("num_hidden_layers"),
            "dtype": a.dtype,
            "backend": backend,
            "device": device,
            "engine_devices": engine_devices,
            "engines": len(urls),
            "iters": a.iters,
            "warmup": a.warmup,
            "bucket_mb": a.bucket_mb,
            "preset": a.preset,
            "config": a.config,
            "total_gb": a.total_gb,
        },
    )
    report.machine = machine(device)
    try:
        sync.connect()
        for mb in a.bucket_mb:
            sync.bucket_bytes = max(1, int(mb * (1 << 20)))
            r = bench(sync, named, iters=a.iters, warmup=a.warmup)
            report.rows.append(
                {
                    "bucket_mb": float(mb),
                    "buckets": int(r["buckets"]),
                    "seconds": r["seconds"],
                    "median_s": r["median_seconds"],
                    "sync_gb_s": r["gb_per_s"],
                    "raw_seconds": r["raw_seconds"],
                    "raw_median_s": r["raw_median_seconds"],
                    "raw_gb_s": r["raw_gb_per_s"],
                    "ratio": r["ratio"],
                    "median_ratio": r["median_ratio"],
                }
            )
        verified = verify(urls, named)
    finally:
        sync.close()
    best = max(report.rows, key=lambda r: r["ratio"])
    report.summary = {
        "weights_gib": total / GIB,
        "tensors": len(named),
        "params": sum(t.numel() for _, t in named),
        "best_bucket_mb": best["bucket_mb"],
        "best_sync_gb_s": best["sync_gb_s"],
        "best_ratio": best["ratio"],
        "target_ratio": 0.9,
        "meets_target": best["ratio"] >= 0.9,
        "verified_tensors": verified,
    }
    report.notes.append(
        "ratio = sync GB/s / raw dist.broadcast GB/s of the same bytes (one tensor) over the same "
        "group between the same processes (1.0 = link limit), each sync followed by its raw broadcasts; "
        "seconds are the best of --iters after --warmup untimed syncs, median_s the median, "
        "median_ratio the ratio of the medians"
    )
    del named
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return report


def _defaults(a: argparse.Namespace) -> tuple[str, str]:
    import torch

    device = a.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    backend = a.backend or ("nccl" if device.startswith("cuda") else "gloo")
    if backend == "nccl" and not device.startswith("cuda"):
        raise UserError("--backend nccl needs CUDA devices (--device cuda:N)")
    return device, backend


def _engine_device(a: argparse.Namespace, device: str, index: int) -> str:
    if a.engine_device:
        return str(a.engine_device)
    if device.startswith("cuda"):
        import torch

        n = torch.cuda.device_count()
        return f"cuda:{(index + 1) % n}" if n > 1 else device
    return device


def _die_with_parent() -> None:
    """In an engine child (Linux): get SIGTERM when the benchmark process dies, even by SIGKILL.

    The engines run in sessions of their own (a terminal's Ctrl-C must reach the benchmark, which
    then stops them in order), so without this an engine whose benchmark was killed keeps its GPU memory.
    """
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_local(a: argparse.Namespace) -> Report:
    """Start ``--engines`` engine processes on this machine, measure, stop them."""
    data = model_config(a)
    device, backend = _defaults(a)
    if a.engines < 1:
        raise UserError(f"--engines must be >= 1, got {a.engines}")
    engine_devices = [_engine_device(a, device, i) for i in range(a.engines)]
    if backend == "nccl" and len({device, *engine_devices}) < 1 + a.engines:
        raise UserError(
            f"NCCL puts at most one rank of a group on a GPU, but the sender ({device}) and the engines "
            f"({', '.join(engine_devices)}) share one; give every engine its own GPU (--engine-device, "
            "fewer --engines) or use --backend gloo"
        )
    previous = None
    if threading.current_thread() is threading.main_thread():
        # `timeout` and schedulers stop us with SIGTERM: exit through the finally below, which stops the engines
        # (they run in sessions of their own; _die_with_parent covers a SIGTERM that comes while we wait in C).
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return _run_engines_and_measure(a, data, device, backend, engine_devices)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run_engines_and_measure(
    a: argparse.Namespace, data: dict[str, Any], device: str, backend: str, engine_devices: list[str]
) -> Report:
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="miles-bench-sync-") as tmp:
        d = Path(tmp)
        cfg = write_atomic(d / "config.json", json.dumps(data))
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        env.setdefault("OMP_NUM_THREADS", "1")

        ready = [d / f"engine-{i}.url" for i in range(a.engines)]
        try:
            for i in range(a.engines):
                logs.append(d / f"engine-{i}.log")
                with open(logs[-1], "wb") as log:
                    procs.append(
                        subprocess.Popen(
                            _receiver_cmd(cfg, a.dtype, engine_devices[i], "127.0.0.1", free_port(), ready[i], None),
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            env=env,
                            start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                        )
                    )
            urls = wait_for_urls(ready, procs, logs, a.timeout)
            return measure(a, data, urls, device, backend, "127.0.0.1", engine_devices)
        except BaseException:
            for i, log_path in enumerate(logs):  # the engines' side of a failure or a hang, before tmp goes
                if log_path.exists():
                    tail = log_path.read_text(errors="replace")[-2000:]
                    print(f"--- bench engine {i} log tail:\n{tail}", file=sys.stderr, flush=True)
            raise
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def task_layout(a: argparse.Namespace) -> tuple[int, int, int, Path]:
    """(rank, tasks, local rank, rendezvous directory) of this task under Slurm (``--slurm``) or torchrun."""
    if a.slurm:
        names, launcher = (
            ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
            "--slurm needs SLURM_PROCID and SLURM_NTASKS: run it under `srun -n K` (K >= 2)",
        )
        default = (
            Path(os.environ.get("SLURM_SUBMIT_DIR", ".")) / f".miles-bench-sync-"
            f"{os.environ.get('SLURM_JOB_ID', 'local')}.{os.environ.get('SLURM_STEP_ID', '0')}"
        )
    else:
        names, launcher = (
            ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
            "--torchrun needs RANK and WORLD_SIZE: run it "
            "under `torchrun --nproc-per-node K -m miles.cli bench sync --torchrun ...` (K >= 2)",
        )
        default = (
            Path(tempfile.gettempdir()) / f"miles-bench-sync-{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}"
            f"-{os.environ.get('MASTER_PORT', '0')}"
        )
    try:
        rank, tasks = int(os.environ[names[0]]), int(os.environ[names[1]])
    except (KeyError, ValueError) as e:
        raise UserError(launcher) from e
    if tasks < 2:
        raise UserError(
            f"{'--slurm' if a.slurm else '--torchrun'} needs at least 2 tasks (one sender, one engine); "
            f"this one has {tasks}"
        )
    return rank, tasks, int(os.environ.get(names[2], "0")), Path(a.rendezvous) if a.rendezvous else default


def run_tasks(a: argparse.Namespace) -> Report | None:
    """One task of a Slurm step or a torchrun job: task 0 measures and reports, the others serve until it is done."""
    procid, ntasks, local, rdv = task_layout(a)
    # torchrun tells torch's tcp:// rendezvous to join its agent's store instead of hosting one; the weight-update
    # group hosts its own store on the sender (as SGLang's recipe does), so that hint must not reach it.
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    rdv.mkdir(parents=True, exist_ok=True)
    data = model_config(a)
    device, backend = _defaults(a)
    if device.startswith("cuda") and a.device is None:
        import torch

        device = f"cuda:{local % max(1, torch.cuda.device_count())}"  # srun --gpus-per-task shows one GPU a task
    done = rdv / "done"
    if procid != 0:
        done.unlink(missing_ok=True)  # left by an earlier run in the same directory; the sender waits for us
        engine_device = a.engine_device or device
        serve(
            data,
            a.dtype,
            engine_device,
            "0.0.0.0",
            free_port(),
            str(rdv / f"engine-{procid}.url"),
            str(done),
            announce_host=socket.gethostname() if a.slurm else "127.0.0.1",
        )
        return None
    ready = [rdv / f"engine-{i}.url" for i in range(1, ntasks)]
    try:
        urls = wait_for_urls(ready, None, None, a.timeout)
        return measure(
            a, data, urls, device, backend, a.master_addr or (socket.gethostname() if a.slurm else "127.0.0.1")
        )
    finally:
        write_atomic(done, "done\n")


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    if a.iters < 1:
        raise UserError(f"--iters must be >= 1, got {a.iters}")
    if any(mb <= 0 for mb in a.bucket_mb):
        raise UserError(f"--bucket-mb sizes must be positive, got {a.bucket_mb}")
    if a.slurm and a.torchrun:
        raise UserError("give --slurm or --torchrun, not both")
    if a.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {a.warmup}")
    report = run_tasks(a) if a.slurm or a.torchrun else run_local(a)
    if report is None:
        return 0
    report.print(["bucket_mb", "buckets", "seconds", "median_s", "sync_gb_s", "raw_seconds", "raw_gb_s", "ratio"])
    if a.json_out:
        report.write_json(a.json_out)
    if a.plot:
        plot_sync(report, a.plot)
    return 0
