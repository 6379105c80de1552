"""The run directory: its file names, atomic writes, and engine announcements.

The run directory is the only shared state between the submitting host, the
batch shell and every rank (a shared filesystem on clusters; a local folder for
``miles run``). Every file in it is written to a temporary name and renamed, so
a reader never sees half a file, even when a writer is killed mid-write.

Layout::

    spec.toml          resolved spec (what the ranks load)
    plan.json          the plan (placeholder ports; ranks re-derive them for the job id)
    job.sbatch         the rendered batch script (Slurm runs)
    job.json           {"job_id": ..., "submitted_at": ..., "cluster": ...} (Slurm runs)
    logs/              Slurm output and per-rank logs
    engines/engine-<i>.json   {"url", "host", "port", "pid", "launch_id"}: engine i is healthy
    control/preempt    touched to ask the ranks to save and stop
    control/done       touched by the driver when the run is complete (the batch shell then does not requeue)
    control/lock       flock'ed by the live run; names its holder (miles.launch.lock)
    engine.key         the engines' API key, mode 0600 (miles.job.enginekey)
    control/stop-<id>  written by ``miles cancel``: job <id> ends instead of requeueing (miles.launch.lifecycle)
    metrics.jsonl      one line per rollout (written by the loop)
    wandb-run-id       the W&B run id every life of the run logs to ([run] use_wandb)
    wandb/             W&B's own files, one offline-run-*/run-* folder per life (W&B's layout)
    checkpoints/       complete checkpoints (written by miles.ckpt)
    model/             the built-in model, written once when the spec names one
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miles.errors import UserError
from miles.model.directory import model_dir
from miles.spec.tables import Spec

SPEC = "spec.toml"
PLAN = "plan.json"
SCRIPT = "job.sbatch"
JOB = "job.json"
ENGINES = "engines"
CONTROL = "control"
PREEMPT = "control/preempt"
DONE = "control/done"
LOGS = "logs"
METRICS = "metrics.jsonl"
WANDB_RUN_ID = "wandb-run-id"
CHECKPOINTS = "checkpoints"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise UserError(f"{path} does not exist: is this a miles run directory?") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); it was not written by miles") from e


@dataclass(frozen=True, slots=True)
class Announcement:
    """An engine's address, published once it answers ``/health_generate``."""

    index: int
    url: str
    host: str
    port: int
    pid: int
    launch_id: str


def announcement_path(run_dir: Path, index: int) -> Path:
    return run_dir / ENGINES / f"engine-{index}.json"


def announce_engine(run_dir: Path, a: Announcement) -> None:
    write_json(
        announcement_path(run_dir, a.index),
        {
            "index": a.index,
            "url": a.url,
            "host": a.host,
            "port": a.port,
            "pid": a.pid,
            "launch_id": a.launch_id,
        },
    )


def read_announcement(run_dir: Path, index: int, launch_id: str) -> Announcement | None:
    """Engine ``index``'s announcement of *this* launch, or None.

    Announcements of an earlier launch (before a requeue or a restart of ``miles
    run``) are ignored: their engines are gone.
    """
    try:
        d = json.loads(announcement_path(run_dir, index).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if d.get("launch_id") != launch_id:
        return None
    return Announcement(
        index=index, url=d["url"], host=d["host"], port=int(d["port"]), pid=int(d["pid"]), launch_id=d["launch_id"]
    )


def wait_for_engines(
    run_dir: Path, num_engines: int, launch_id: str, deadline_s: float, poll_s: float = 0.2
) -> list[Announcement]:
    """Block until every engine of this launch has announced itself, or fail naming the missing ones."""
    end = time.monotonic() + deadline_s
    found: dict[int, Announcement] = {}
    while True:
        for i in range(num_engines):
            if i not in found:
                a = read_announcement(run_dir, i, launch_id)
                if a is not None:
                    found[i] = a
        if len(found) == num_engines:
            return [found[i] for i in range(num_engines)]
        if time.monotonic() >= end:
            missing = [i for i in range(num_engines) if i not in found]
            raise TimeoutError(
                f"engines {missing} of {num_engines} did not announce themselves in {run_dir / ENGINES} "
                f"within {deadline_s:.0f} s (launch {launch_id}); look at their log lines "
                f"(prefix 'engine <i>') for why they did not become healthy"
            )
        time.sleep(poll_s)


def preempt_requested(run_dir: Path) -> bool:
    """True once someone (the batch shell's USR1 trap, ``miles run``'s Ctrl-C) asked the ranks to save and stop."""
    return (run_dir / PREEMPT).exists()


def model_dir_of(spec: Spec, run_dir: str | Path) -> str:
    """The HF directory the run's actor and every engine load: ``[model] hf_checkpoint``, or the built-in model
    materialized under ``<run_dir>/model`` (seeded, so every process that asks finds the same weights)."""
    m = spec.model
    return model_dir(
        builtin=m.builtin, hf_checkpoint=m.hf_checkpoint, run_dir=run_dir, seed=spec.run.seed, dtype=m.dtype
    )


def clear_stale_control(run_dir: Path) -> None:
    """Remove the flags of earlier launches before a new job of ``run_dir`` is submitted.

    Job ids are unique per cluster only while its state lasts (a fresh local
    cluster counts from 1 again), so even stop files of other ids go.
    """
    control = run_dir / CONTROL
    if not control.is_dir():
        return
    for p in control.iterdir():
        if p.name in ("preempt", "done") or p.name.startswith("stop-"):
            p.unlink(missing_ok=True)
