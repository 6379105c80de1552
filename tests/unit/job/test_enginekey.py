"""The run's engine key: written 0600 into the run directory, given to the engines, never printed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from miles.errors import UserError
from miles.job import enginekey, rundir
from miles.spec import load_spec
from miles.spec.tables import RolloutConfig, Spec

ROOT = Path(__file__).resolve().parents[3]


def test_the_key_is_generated_once_readable_by_its_owner_only(tmp_path: Path) -> None:
    spec = Spec()
    assert spec.rollout.engine_auth  # on unless turned off
    enginekey.ensure(tmp_path, spec)
    path = tmp_path / enginekey.KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = enginekey.load(tmp_path, spec)
    assert key is not None and len(key) == 64 and int(key, 16) >= 0
    enginekey.ensure(tmp_path, spec)  # a run started again keeps its key
    assert enginekey.load(tmp_path, spec) == key
    env = {"MILES_ENGINE_API_KEY": "stale"}
    enginekey.export(tmp_path, spec, env)
    assert env == {"MILES_ENGINE_API_KEY": key}


def test_engine_auth_false_leaves_the_engines_open(tmp_path: Path) -> None:
    spec = Spec(rollout=RolloutConfig(engine_auth=False))
    enginekey.ensure(tmp_path, spec)
    assert not (tmp_path / enginekey.KEY_FILE).exists()
    env = {"MILES_ENGINE_API_KEY": "from the shell"}
    enginekey.export(tmp_path, spec, env)
    assert env == {}


def test_a_run_directory_without_its_key_is_an_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="engine.key is missing"):
        enginekey.load(tmp_path, Spec())


def test_the_sglang_api_key_flag_is_refused_with_where_to_look(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(
        '[run]\nnum_rollout = 1\n[model]\nbuiltin = "tiny-arith"\n[sglang]\napi_key = "mine"\n'
    )
    with pytest.raises(UserError, match="engine_auth"):
        load_spec(str(tmp_path / "s.toml"), [])


def test_copy_redacted_takes_the_key_out_of_a_server_log(tmp_path: Path) -> None:
    key = "0123abcd" * 8
    p = subprocess.Popen(
        [sys.executable, "-c", f"print('server_args=api_key={key!s} port=1'); print('{key}')"], stdout=subprocess.PIPE
    )
    assert p.stdout is not None
    enginekey.copy_redacted(p.stdout, tmp_path / "log", key)
    p.wait()
    text = (tmp_path / "log").read_text()
    assert key not in text and text.count(enginekey.REDACTED) == 2 and "port=1" in text


SPEC = """
[run]
name = "keyed"
num_rollout = 1
[model]
builtin = "tiny-arith"
dtype = "float32"
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


def _status(url: str, method: str, key: str | None) -> int:
    req = urllib.request.Request(
        url,
        data=b"{}" if method == "POST" else None,
        method=method,
        headers={"Authorization": f"Bearer {key}"} if key else {},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_an_engine_rank_serves_with_the_run_directory_key_and_prints_it_nowhere(tmp_path: Path) -> None:
    from miles.launch.local import prepare_run_dir, rank_envs

    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1+1=", "label": "2"}\n')
    (tmp_path / "s.toml").write_text(SPEC)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        run_dir, _, held = prepare_run_dir(load_spec("s.toml", []))
    finally:
        os.chdir(cwd)
    held.release()
    key = (run_dir / enginekey.KEY_FILE).read_text().strip()
    base = {k: v for k, v in os.environ.items() if k != "MILES_ENGINE_API_KEY"}
    ((_, _, env),) = [
        e for e in rank_envs(run_dir, 1, 1, dict(base, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")) if e[1] == "engine"
    ]
    out = open(tmp_path / "engine.out", "w+")  # noqa: SIM115 - closed below
    task = subprocess.Popen(
        [sys.executable, "-m", "miles.launch.task", "--run-dir", str(run_dir), "--role", "engine"],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        end = time.monotonic() + 180
        while (a := rundir.read_announcement(run_dir, 0, env["MILES_LAUNCH_ID"])) is None:
            assert task.poll() is None and time.monotonic() < end, (tmp_path / "engine.out").read_text()
            time.sleep(0.2)
        assert _status(a.url + "/health", "GET", None) == 200
        for path in ("/update_weights_from_tensor", "/update_weights_from_distributed", "/generate", "/model_info"):
            method = "GET" if path == "/model_info" else "POST"
            assert _status(a.url + path, method, None) == 401, path
            assert _status(a.url + path, method, "wrong") == 401, path
        assert _status(a.url + "/model_info", "GET", key) == 200
    finally:
        task.terminate()
        task.wait(timeout=30)
        out.close()
    printed = (tmp_path / "engine.out").read_text() + (run_dir / "logs" / "engine-0.log").read_text()
    assert "miles.engine.server" in printed and key not in printed  # the key went in the environment only
