"""Stopping a run: the preempt flag, the ranks' agreement on it, and the mark of a complete run.

Preemption: a flag file (``<run_dir>/control/preempt``, touched by the batch
shell's USR1/TERM trap, by ``miles run`` on Ctrl-C, or by a rank's own SIGTERM
handler) is agreed on by all ranks at each phase boundary through an
all-reduce, never inside a signal handler. The ranks then save and exit 0, and
the batch shell requeues the job. ``done`` tells the batch shell and ``miles
status`` that the run finished and must not be requeued.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist


def control_dir(run_dir: Path) -> Path:
    """Flag files shared by the batch shell, the launcher and the ranks (``preempt``, ``done``)."""
    return run_dir / "control"


def install_stop_handlers(run_dir: Path) -> None:
    """SIGTERM/SIGINT only touch the preempt flag: the ranks act on it at the next boundary."""
    control = control_dir(run_dir)

    def handler(signum: int, frame: FrameType | None) -> None:
        control.mkdir(parents=True, exist_ok=True)
        flag = control / "preempt"
        if signum == signal.SIGINT and flag.exists():
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        flag.touch()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    os.environ.setdefault("MILES_STOP_FLAG", str(control / "preempt"))


def stop_requested(run_dir: Path, device: str) -> bool:
    """Whether any rank saw the preempt flag; agreed by all-reduce at a phase boundary (collective)."""
    # On the collective's device: an NCCL world has no CPU backend.
    on = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else None
    flag = torch.tensor([1 if (control_dir(run_dir) / "preempt").exists() else 0], dtype=torch.int32, device=on)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def mark_done(run_dir: Path, num_rollout: int) -> None:
    """Tell the batch shell (no requeue) and ``miles status`` that the run is complete."""
    control_dir(run_dir).mkdir(parents=True, exist_ok=True)
    (control_dir(run_dir) / "done").write_text(json.dumps({"num_rollout": num_rollout}))
