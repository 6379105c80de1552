"""The engine rank of a job (``serve_engine``): announce when healthy, restart and re-announce, stop on SIGTERM.

Runs with the embedded engine standing in for SGLang (the local cluster's way:
same launcher path, command swapped), in a child process as ``miles.launch.task``
would run it, since the task installs its own signal handlers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from miles.job import rundir
from miles.job.ports import free_port
from miles.sglang import launcher as sl

pytestmark = pytest.mark.slow

TASK = """
import sys
from pathlib import Path
from types import SimpleNamespace
from miles.launch.engine_host import serve_engine
from miles.spec.tables import ModelConfig, RolloutConfig, Spec

run_dir, port = Path(sys.argv[1]), int(sys.argv[2])
spec = Spec(model=ModelConfig(builtin="tiny-arith", dtype="float32"), rollout=RolloutConfig(engine="sglang"))
ctx = SimpleNamespace(engine_index=0, engine_port=port, engine_host="127.0.0.1", node_name="node0",
                      run_dir=run_dir, device="cpu", launch_id="launch-1", engine_gpus=(), engine_nccl_port=None)
serve_engine(spec, ctx, deadline_s=300, kind="embedded")
"""


def _wait_announcement(run_dir: Path, not_pid: int | None, deadline_s: float) -> rundir.Announcement:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        a = rundir.read_announcement(run_dir, 0, "launch-1")
        if a is not None and a.pid != not_pid:
            return a
        time.sleep(0.2)
    raise AssertionError(f"no announcement (other than pid {not_pid}) after {deadline_s} s")


def test_engine_task_announces_restarts_and_stops(tmp_path: Path) -> None:
    script = tmp_path / "task.py"
    script.write_text(textwrap.dedent(TASK))
    env = {**os.environ, "MILES_ENGINE_API_KEY": "job-key", "OMP_NUM_THREADS": "1"}
    task = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(free_port(0))],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first = _wait_announcement(tmp_path, None, 300)
        assert sl.health_ok(first.url, "job-key")
        os.kill(first.pid, signal.SIGKILL)  # the engine server dies; the task must bring it back
        second = _wait_announcement(tmp_path, first.pid, 300)
        assert second.url == first.url and sl.health_ok(second.url, "job-key")
        task.send_signal(signal.SIGTERM)
        out, _ = task.communicate(timeout=60)
    finally:
        if task.poll() is None:
            task.kill()
            task.wait()
    assert task.returncode == 0, out
    assert out.count("healthy at") == 2, out
    assert not sl.health_ok(second.url)
    log = (tmp_path / "logs" / "engine-0.log").read_text()
    assert log.count("===== miles: start") == 2
