"""An embedded engine started as a child process on this machine, for tests, benchmarks and one-machine runs.

The weight sync joins a process group with its engines, and killing an engine
must not kill the caller, so these need real engine processes without a Slurm
launcher. :class:`LocalEngine` describes the child (``python -m
miles.engine.server`` on a free port, a few threads, its log in a file) and
hands it to the one engine-process class, :class:`miles.sglang.launcher.EngineProcess`,
which every engine of a job also runs under; a failed start is reported with
the log's tail.
"""

from __future__ import annotations

import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from miles.job.ports import free_port
from miles.sglang.launcher import EngineLaunch, EngineProcess


class LocalEngine:
    """A running ``python -m miles.engine.server`` child; ``stop()`` ends it (also on ``with`` exit)."""

    def __init__(
        self,
        model_dir: str | Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        api_key: str | None = None,
        extra_args: list[str] | None = None,
        log_path: str | Path | None = None,
        threads: int = 1,
        startup_timeout_s: float = 180.0,
        wait: bool = True,
    ) -> None:
        self.host = host
        self.port = port or free_port(host=host)
        self.api_key = api_key
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="miles-engine-", suffix=".log")[1])
        argv = [
            sys.executable,
            "-m",
            "miles.engine.server",
            "--model",
            str(model_dir),
            "--host",
            host,
            "--port",
            str(self.port),
            *(extra_args or []),
        ]
        threads_env = {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.process = EngineProcess(
            EngineLaunch(
                index=0,
                kind="embedded",
                argv=tuple(argv),
                env=threads_env,
                host=host,
                port=self.port,
                api_key=api_key,
                log_path=self.log_path,
            )
        )
        self.url = self.process.url
        self.startup_timeout_s = startup_timeout_s
        self.process.start()
        if wait:
            self.wait_ready()

    @property
    def proc(self) -> Any:
        """The child's ``subprocess.Popen``."""
        return self.process.proc

    @classmethod
    def start_many(cls, model_dir: str | Path, count: int, **kw: Any) -> list[LocalEngine]:
        """Start ``count`` engines at once (their start-ups overlap) and wait for all."""
        engines = [cls(model_dir, wait=False, **kw) for _ in range(count)]
        try:
            for e in engines:
                e.wait_ready()
        except BaseException:
            for e in engines:
                e.stop()
            raise
        return engines

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until the engine generates; a child that exits or never answers is stopped and reported."""
        try:
            self.process.wait_healthy(self.startup_timeout_s if timeout_s is None else timeout_s, poll_s=0.3)
        except BaseException:
            self.stop()
            raise

    def kill(self) -> None:
        """SIGKILL, as a crash would (no clean shutdown)."""
        if self.process.alive():
            self.process.signal(signal.SIGKILL)
            self.process.proc.wait()  # type: ignore[union-attr]

    def stop(self, timeout_s: float = 10.0) -> None:
        self.process.stop(timeout_s=timeout_s)

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
