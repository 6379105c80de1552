"""``miles run`` (the local launcher) with real processes running ``miles.launch.task --selftest``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

SPEC = """
[run]
name = "local"
num_rollout = 1
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


def _start(tmp: Path, hold: float = 0, grace: float = 30) -> subprocess.Popen[str]:
    rows = [{"prompt": f"{a:02d}+{a:02d}=", "label": str(2 * a % 10)} for a in range(20)]
    (tmp / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "run.toml").write_text(SPEC)
    env = dict(
        os.environ,
        MILES_SELFTEST="1",
        MILES_SELFTEST_HOLD=str(hold),
        MILES_GRACE_S=str(grace),
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    return subprocess.Popen(
        [sys.executable, "-m", "miles.cli", "run", "run.toml"],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_report(run_dir: Path, name: str, proc: subprocess.Popen[str], timeout: float = 90) -> dict:
    path = run_dir / "selftest" / f"{name}.json"
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            pytest.fail(f"{name} never reported:\n{proc.communicate()[0]}")
        time.sleep(0.2)
    return json.loads(path.read_text())


def test_local_run_completes_and_runs_again_on_the_same_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "local"
    launch_ids = []
    for _ in range(2):  # the second start reuses the run directory and ignores the first's announcements
        proc = _start(tmp_path)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "trainer 0 | " in out and "engine 1 | " in out and "broadcast checked by all 2 engines" in out
        driver = json.loads((run_dir / "selftest" / "trainer-0.json").read_text())
        assert driver["all_reduce"] == 3 and driver["engines_ok"] == 2 and driver["phase"] == "done"
        ctx = driver["context"]
        assert (ctx["launcher"], ctx["world_size"], ctx["backend"], ctx["master_addr"]) == (
            "torchrun",
            2,
            "gloo",
            "127.0.0.1",
        )
        launch_ids.append(ctx["launch_id"])
    assert launch_ids[0] != launch_ids[1]
    assert {"spec.toml", "plan.json", "engines", "control"} <= {p.name for p in run_dir.iterdir()}


def test_a_dying_rank_ends_the_run_naming_it(tmp_path: Path) -> None:
    proc = _start(tmp_path, hold=300)
    rep = _wait_report(tmp_path / "runs" / "local", "trainer-1", proc)
    t0 = time.monotonic()
    os.kill(rep["pid"], signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    assert proc.returncode != 0
    assert "trainer 1 (pid" in out and "was killed by SIGKILL" in out, out
    assert "engine 0, engine 1, trainer 0 ended because trainer 1 failed" in out, out


def test_ctrl_c_asks_the_ranks_to_stop_and_they_agree(tmp_path: Path) -> None:
    proc = _start(tmp_path, hold=300)
    run_dir = tmp_path / "runs" / "local"
    _wait_report(run_dir, "trainer-0", proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert (run_dir / "control" / "preempt").exists() and not (run_dir / "control" / "done").exists()
    assert "asked the ranks to checkpoint" in out and "all ranks agreed" in out
    for r in range(2):
        assert json.loads((run_dir / "selftest" / f"trainer-{r}.json").read_text())["phase"] == "preempted"


def _plan(text: str):  # type: ignore[no-untyped-def]
    import tomllib

    from miles.plan import make_plan
    from miles.spec import spec_from_dict

    return make_plan(spec_from_dict(tomllib.loads(text)))


def test_a_split_plan_on_one_machine_puts_the_trainers_after_the_engines(tmp_path: Path) -> None:
    """On a 4-GPU machine a split spec's engines keep GPUs 0-1 (their plan's) and the trainers see 2-3."""
    from miles.errors import UserError
    from miles.launch.local import local_trainer_gpus, rank_envs

    split = SPEC.replace('mode = "colocate"\ngpus_per_node = 0', 'mode = "split"\ngpus_per_node = 2').replace(
        'device = "cpu"', 'device = "cuda"\nrollout_num_nodes = 1\nrollout_num_gpus = 2'
    )
    plan = _plan(split)
    assert [e.gpus for e in plan.engines] == [(0,), (1,)]
    assert local_trainer_gpus(plan) == (2, 3)
    envs = rank_envs(tmp_path, 2, 2, {}, local_trainer_gpus(plan))
    assert [(n, env.get("CUDA_VISIBLE_DEVICES"), env["LOCAL_RANK"]) for n, _, env in envs] == [
        ("engine 0", None, "0"),
        ("engine 1", None, "1"),
        ("trainer 0", "2,3", "0"),
        ("trainer 1", "2,3", "1"),
    ]
    assert local_trainer_gpus(_plan(SPEC)) == ()  # colocated: trainers and engines share the GPUs by design
    with pytest.raises(UserError, match="actor_num_nodes = 1"):
        local_trainer_gpus(_plan(split.replace("actor_num_nodes = 1", "actor_num_nodes = 2")))


def test_a_failing_driver_is_told_first_and_its_followers_in_one_line(tmp_path: Path) -> None:
    """A real run whose driver dies of an error: its traceback on the console, trainer 1's (a lost peer) only
    in trainer 1's log, and one line naming the ranks that ended because of it."""
    (tmp_path / "boom.py").write_text(
        "class Fatal(BaseException):\n    pass\n\n\ndef reward(sample):\n    raise Fatal('the reward model is gone')\n"
    )
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "01+01=", "label": "2"}\n' * 8)
    (tmp_path / "run.toml").write_text(
        SPEC.replace('rm_type = "exact_match"', 'custom_rm_path = "boom.py:reward"\nrollout_max_response_len = 4')
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("MILES_SELFTEST", None)
    proc = subprocess.run(
        [sys.executable, "-m", "miles.cli", "run", "run.toml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "trainer 0 | miles task trainer 0" in out and "FAILED: Fatal: the reward model is gone" in out
    assert "trainer 0 | Traceback (most recent call last):" in out
    assert "trainer 1 | Traceback" not in out and "trainer 1 | miles task" not in out
    assert "engine 0, engine 1, trainer 1 ended because trainer 0 failed" in out
    logs = tmp_path / "runs" / "local" / "logs"
    assert "FAILED" in (logs / "trainer-1.out").read_text()  # the follower's own story stays in its log
