"""Start ``fsdp_worker.py`` on several local ranks, as torchrun would, and collect rank 0's results."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

WORKER = Path(__file__).with_name("fsdp_worker.py")
REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Launch:
    """``world_size`` worker processes running ``scenarios``; rank 0's results come back per scenario."""

    def __init__(self, world_size: int, out: Path, model_dir: Path, scenarios: list[str], device: str = "cpu") -> None:
        out.mkdir(parents=True)
        self.out, self.world_size, self.scenarios = out, world_size, scenarios
        port = _free_port()
        self.procs = []
        for rank in range(world_size):
            env = dict(
                os.environ,
                RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
                MILES_TEST_DEVICE=device,
                PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            )
            with open(out / f"rank{rank}.log", "w") as log:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, str(WORKER), str(out), str(model_dir), *scenarios],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )

    def results(self) -> dict[str, Any]:
        try:
            codes = [p.wait(timeout=300) for p in self.procs]
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if any(codes):
            logs = "\n".join((self.out / f"rank{r}.log").read_text()[-3000:] for r in range(self.world_size))
            raise AssertionError(f"worker exit codes {codes}:\n{logs}")
        return {s: torch.load(self.out / f"{s}.pt", weights_only=False) for s in self.scenarios}
