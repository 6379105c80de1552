"""One writer per run directory: the lock, held by real processes and released by the kernel when they die."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from miles.errors import UserError
from miles.launch import lock

ROOT = Path(__file__).resolve().parents[3]

HOLD = """
import sys, time
from pathlib import Path
from miles.launch import lock
held = lock.acquire(Path(sys.argv[1]), "a test holder")
print("held", flush=True)
time.sleep(600)
"""


def _holder(run_dir: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "held", p.communicate()[0]
    return p


def test_a_second_writer_is_refused_naming_the_holder_and_admitted_once_it_is_killed(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    try:
        with pytest.raises(UserError) as err:
            lock.acquire(tmp_path, "a second run", settle_s=0)
        msg = str(err.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in msg and "a test holder" in msg
        with pytest.raises(UserError):
            lock.check_free(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    held = lock.acquire(tmp_path, "after the kill", settle_s=0)  # the kernel released it with the holder
    try:
        assert json.loads((tmp_path / lock.LOCK).read_text())["pid"] == os.getpid()
    finally:
        held.release()
    lock.check_free(tmp_path)


def test_children_that_inherit_the_lock_hold_it_until_they_are_gone(tmp_path: Path) -> None:
    held = lock.acquire(tmp_path, "a launcher", settle_s=0)
    child = subprocess.Popen(["sleep", "600"], pass_fds=(held.fd,))
    held.release()  # the launcher is gone; its rank is not
    try:
        with pytest.raises(UserError, match="a launcher"):
            lock.acquire(tmp_path, "a second run", settle_s=0)
    finally:
        child.kill()
        child.wait()
    lock.acquire(tmp_path, "a second run", settle_s=0).release()


SPEC = """
[run]
name = "locked"
num_rollout = 1
[model]
builtin = "tiny-arith"
[rollout]
engine = "embedded"
prompt_data = "prompts.jsonl"
input_key = "prompt"
rollout_batch_size = 4
n_samples_per_prompt = 2
rm_type = "exact_match"
[train]
global_batch_size = 8
[perf]
backend = "fsdp"
[cluster]
gpus_per_node = 0
actor_num_gpus_per_node = 1
device = "cpu"
"""


def test_miles_run_refuses_a_run_directory_in_use_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1+1=", "label": "2"}\n')
    (tmp_path / "run.toml").write_text(SPEC)
    run_dir = tmp_path / "runs" / "locked"
    run_dir.mkdir(parents=True)
    holder = _holder(run_dir)
    try:
        t0 = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-m", "miles.cli", "run", "run.toml"],
            cwd=tmp_path,
            timeout=120,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
        )
        assert res.returncode == 2, res.stdout + res.stderr
        assert f"is in use by a test holder (pid {holder.pid} on {socket.gethostname()}" in res.stderr
        assert not (run_dir / "spec.toml").exists()  # refused before writing anything
        assert time.monotonic() - t0 < 60
    finally:
        holder.kill()
        holder.wait()
