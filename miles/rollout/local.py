"""Start an embedded engine as a child process on this machine and wait until it serves.

Tests, benchmarks and single-machine runs need real engine processes (the
weight sync joins a process group with them; killing one must not kill the
caller) without a Slurm launcher. The child runs ``python -m
miles.rollout.server`` on a free port; its log goes to a file so a failure to
start is reported with the log's tail.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EngineProcess:
    """A running ``python -m miles.rollout.server`` child; ``stop()`` ends it (also on ``with`` exit)."""

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
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.api_key = api_key
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="miles-engine-", suffix=".log")[1])
        cmd = [sys.executable, "-m", "miles.rollout.server", "--model", str(model_dir), "--host", host,
               "--port", str(self.port), *(extra_args or [])]
        if api_key:
            cmd += ["--api-key", api_key]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
        self._log = open(self.log_path, "ab")
        from miles.launch.orphans import die_with_parent

        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                     preexec_fn=die_with_parent())
        self.startup_timeout_s = startup_timeout_s
        if wait:
            self.wait_ready()

    @classmethod
    def start_many(cls, model_dir: str | Path, count: int, **kw: object) -> list[EngineProcess]:
        """Start ``count`` engines at once (their start-ups overlap) and wait for all."""
        procs = [cls(model_dir, wait=False, **kw) for _ in range(count)]  # type: ignore[arg-type]
        try:
            for p in procs:
                p.wait_ready()
        except BaseException:
            for p in procs:
                p.stop()
            raise
        return procs

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait for /health; a child that exits or never answers is stopped and reported with its log tail."""
        timeout_s = self.startup_timeout_s if timeout_s is None else timeout_s
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with {self.proc.returncode} before serving; log tail:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        raise TimeoutError(f"engine at {self.url} not healthy after {timeout_s:.0f} s; log tail:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL, as a crash would (no clean shutdown)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
