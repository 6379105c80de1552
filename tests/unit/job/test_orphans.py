"""No orphans: every process a run starts dies with it, SIGKILL included (real processes, real ``miles run``)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from miles.job import orphans

ROOT = Path(__file__).resolve().parents[3]
PY = sys.executable

pytestmark = pytest.mark.skipif(not orphans.available(), reason="needs Linux's parent-death signal")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _wait_gone(pids: list[int], within_s: float) -> list[int]:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _chain(tmp: Path, middle_body: str) -> tuple[subprocess.Popen[str], list[int]]:
    """Start a middle process running ``middle_body`` (which writes the pids it started to pids.json)."""
    script = tmp / "middle.py"
    script.write_text(textwrap.dedent(middle_body))
    proc = subprocess.Popen(
        [PY, str(script), str(tmp / "pids.json")],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    end = time.monotonic() + 30
    while not (tmp / "pids.json").exists():
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()[0]
        time.sleep(0.05)
    return proc, json.loads((tmp / "pids.json").read_text())


def test_a_child_started_with_the_parent_death_signal_dies_with_its_killed_parent(tmp_path: Path) -> None:
    middle, (child,) = _chain(
        tmp_path,
        """
        import json, subprocess, sys, time
        from miles.job.orphans import die_with_parent
        p = subprocess.Popen(["sleep", "600"], preexec_fn=die_with_parent(), start_new_session=True)
        open(sys.argv[1] + ".tmp", "w").write(json.dumps([p.pid]))
        import os; os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(600)
    """,
    )
    assert _alive(child)
    middle.kill()
    middle.wait()
    assert _wait_gone([child], 5) == [], "the child outlived its SIGKILLed parent"


def test_a_process_whose_parent_is_gone_ends_its_whole_group(tmp_path: Path) -> None:
    # middle -> watcher (session leader, watching its parent) -> sleep (no death signal of its own)
    middle, (watcher, grandchild) = _chain(
        tmp_path,
        """
        import json, os, subprocess, sys, time
        code = ("import subprocess, sys, time, json, os; from miles.job.orphans import watch_parent; "
                "watch_parent(poll_s=0.1); p = subprocess.Popen(['sleep', '600']); "
                "open(sys.argv[1] + '.tmp', 'w').write(json.dumps([os.getpid(), p.pid])); "
                "os.replace(sys.argv[1] + '.tmp', sys.argv[1]); time.sleep(600)")
        subprocess.Popen([sys.executable, "-c", code, sys.argv[1]], start_new_session=True)
        time.sleep(600)
    """,
    )
    assert _alive(watcher) and _alive(grandchild)
    middle.kill()
    middle.wait()
    assert _wait_gone([watcher, grandchild], 5) == [], "the orphaned watcher left its group running"


SPEC = """
[run]
name = "orphans"
num_rollout = 1000
[model]
builtin = "tiny-arith"
dtype = "float32"
[rollout]
engine = "embedded"
prompt_data = "prompts.jsonl"
input_key = "prompt"
label_key = "label"
rollout_batch_size = 4
n_samples_per_prompt = 2
rm_type = "exact_match"
rollout_max_response_len = 4
[train]
global_batch_size = 8
[perf]
backend = "fsdp"
[cluster]
mode = "colocate"
gpus_per_node = 0
actor_num_nodes = 1
actor_num_gpus_per_node = 2
device = "cpu"
"""


def _run_processes(run_dir: Path) -> list[int]:
    """Every live process of this run: they all carry ``MILES_RUN_DIR`` (engine servers inherit it)."""
    mark = f"MILES_RUN_DIR={run_dir}".encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if mark in env and _alive(int(entry)):
            found.append(int(entry))
    return found


def _describe(pids: list[int]) -> str:
    out = []
    for p in pids:
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            out.append(f"{p}: {cmd[:150]}")
        except OSError:
            pass
    return "\n".join(out)


def test_sigkill_of_miles_run_at_random_moments_leaves_no_process_of_the_run(tmp_path: Path) -> None:
    rows = [{"prompt": f"{a:02d}+{a:02d}=", "label": str(2 * a % 10)} for a in range(20)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.toml").write_text(SPEC)
    run_dir = tmp_path / "runs" / "orphans"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("MILES_RUN_DIR", None)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    # Three kills at random moments (ranks starting, engines loading, the loop going), and one once the engine
    # servers, the grandchildren, are certainly up.
    moments: list[float | None] = [rng.uniform(0.5, 10.0) for _ in range(3)] + [None]
    for i, at in enumerate(moments):
        log = open(tmp_path / f"run-{i}.out", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [PY, "-m", "miles.cli", "run", "run.toml"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        t0 = time.monotonic()
        if at is None:
            while len(list((run_dir / "engines").glob("engine-*.json"))) < 2 or not any(
                "miles.engine.server" in _describe([p]) for p in _run_processes(run_dir)
            ):
                assert proc.poll() is None and time.monotonic() - t0 < 120, (tmp_path / f"run-{i}.out").read_text()
                time.sleep(0.2)
        else:
            while time.monotonic() - t0 < at:
                assert proc.poll() is None, (tmp_path / f"run-{i}.out").read_text()
                time.sleep(0.05)
        before = _run_processes(run_dir)
        proc.kill()
        proc.wait()
        log.close()
        left = _wait_gone(_run_processes(run_dir), 5)
        assert not left, (
            f"kill {i} at {time.monotonic() - t0:.1f} s (seed {seed}): {len(left)} of {len(before)} "
            f"processes of the run outlived miles run by 5 s:\n{_describe(left)}"
        )
    assert len(before) >= 5, _describe(before)  # launcher, 2 trainers, 2 engine tasks (+ their servers)
