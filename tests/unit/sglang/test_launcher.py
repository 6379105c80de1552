"""The SGLang launcher: command lines checked against the pinned flag list, start-up errors, restarts."""

from __future__ import annotations

import dataclasses
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from miles.errors import UserError
from miles.plan.engine_argv import KEY_FROM_ENV
from miles.sglang import launcher as sl
from miles.sglang.flags import alias_map, load_flags
from miles.spec.tables import ModelConfig, PerfConfig, RolloutConfig, SglangConfig, Spec


def _spec(**server_args: object) -> Spec:
    return Spec(
        model=ModelConfig(dtype="float32"),
        rollout=RolloutConfig(engine="sglang", rollout_seed=7),
        sglang=SglangConfig(rollout_num_gpus_per_engine=2, mem_fraction_static=0.7, server_args=dict(server_args)),
    )


def _parse(argv: list[str]) -> dict[str, list[str]]:
    """``--flag v1 v2 --switch`` -> {flag: [v1, v2], switch: []} (underscore keys)."""
    out: dict[str, list[str]] = {}
    key = None
    for tok in argv:
        if tok.startswith("--"):
            key = tok[2:].replace("-", "_")
            out[key] = []
        else:
            assert key is not None, tok
            out[key].append(tok)
    return out


def test_sglang_command_uses_only_flags_of_the_pinned_release_with_their_types() -> None:
    spec = _spec(
        device="cpu",
        attention_backend="torch_native",
        skip_server_warmup=True,
        enable_memory_saver=False,
        dllm_fdfo=False,
        cuda_graph_bs_decode=[1, 2, 4],
        lora_target_modules=["q_proj", "v_proj"],
        json_model_override_args='{"a": 1}',
        radix_eviction_policy_config={"protected_threshold": 4},
        chunked_prefill_size=512,
    )
    argv = sl.sglang_argv(spec, model_path="/m", host="10.0.0.2", port=31000, keyed=True, nccl_port=31100, python="py")
    assert argv[:4] == ["py", "-c", KEY_FROM_ENV, "sglang.launch_server"]
    args = _parse(argv[4:])
    flags = load_flags()
    names = alias_map(flags)
    for key, values in args.items():
        base = key.removeprefix("no_") if key not in names else key
        assert base in names, f"--{key} is not a flag of the pinned SGLang"
        entry = flags[names[base]]
        kind = entry["type"]
        if kind == "bool":
            assert values == [] and (key == base or entry.get("negatable"))
        elif kind == "list":
            assert values and all(v in map(str, entry.get("choices", values)) for v in values)
            [{"int": int, "float": float}.get(entry["item_type"], str)(v) for v in values]
        else:
            assert len(values) == 1
            {"int": int, "float": float}.get(kind, str)(values[0])
            if "choices" in entry:
                assert values[0] in map(str, entry["choices"])
    assert args["model_path"] == ["/m"] and args["host"] == ["10.0.0.2"] and args["port"] == ["31000"]
    assert args["tp_size"] == ["2"] and "api_key" not in args and args["mem_fraction_static"] == ["0.7"]
    assert args["random_seed"] == ["7"] and args["dtype"] == ["float32"] and args["nccl_port"] == ["31100"]
    assert args["skip_server_warmup"] == [] and "enable_memory_saver" not in args
    assert args["no_dllm_fdfo"] == []
    assert args["cuda_graph_bs_decode"] == ["1", "2", "4"]
    assert args["radix_eviction_policy_config"] == ['{"protected_threshold": 4}']


def test_offload_rollout_starts_sglang_with_the_memory_saver_of_the_pinned_release() -> None:
    """Releasing memory frees it only in an SGLang started with the memory saver: colocated on GPUs (offload_rollout
    unset) or with offload_rollout = true, the command carries the pinned release's own switch; not otherwise."""
    assert load_flags()["enable_memory_saver"]["type"] == "bool"
    base = _spec()

    def argv(gpu: bool, offload: bool | None, **server_args: object) -> list[str]:
        spec = dataclasses.replace(
            base,
            perf=PerfConfig(offload_rollout=offload),
            sglang=dataclasses.replace(base.sglang, server_args=dict(server_args)),
        )
        return sl.sglang_argv(spec, model_path="/m", host="h", port=1, keyed=True, gpu=gpu)

    assert argv(gpu=True, offload=None).count("--enable-memory-saver") == 1
    assert argv(gpu=False, offload=True).count("--enable-memory-saver") == 1
    assert argv(gpu=True, offload=True, enable_memory_saver=True).count("--enable-memory-saver") == 1
    assert "--enable-memory-saver" not in argv(gpu=False, offload=None)
    assert "--enable-memory-saver" not in argv(gpu=True, offload=False)
    with pytest.raises(UserError, match="enable_memory_saver = false.*offload_rollout"):
        argv(gpu=True, offload=None, enable_memory_saver=False)


def test_unknown_flag_names_the_closest_one() -> None:
    with pytest.raises(UserError, match=r"chunked_prefil_size.*did you mean chunked_prefill_size"):
        sl.sglang_argv(_spec(chunked_prefil_size=512), model_path="/m", host="h", port=1, keyed=True)


def test_aliases_are_passed_as_the_canonical_flag() -> None:
    assert sl.passthrough_args({"speculative_draft_model": "/d"}) == ["--speculative-draft-model-path", "/d"]
    assert sl.passthrough_args({"data_parallel_size": 2}) == ["--dp-size", "2"]
    assert sl.passthrough_args({"model_checksum": True}) == ["--model-checksum"]


def test_flags_miles_sets_itself_are_refused() -> None:
    with pytest.raises(UserError, match="tp_size.*rollout_num_gpus_per_engine"):
        sl.passthrough_args({"tp_size": 4})


def test_wrong_type_and_choice_are_refused() -> None:
    with pytest.raises(UserError, match="chunked_prefill_size"):
        sl.passthrough_args({"chunked_prefill_size": "big"})
    with pytest.raises(UserError, match="attention_backend"):
        sl.passthrough_args({"attention_backend": "torch-native"})
    with pytest.raises(UserError, match=r"cuda_graph_bs_decode.*integer"):
        sl.passthrough_args({"cuda_graph_bs_decode": [1, "2"]})
    with pytest.raises(UserError, match=r"lora_target_modules.*qproj"):
        sl.passthrough_args({"lora_target_modules": ["qproj"]})


def test_engine_env_pins_gpus_per_engine() -> None:
    assert sl.engine_env((2, 3), "cuda") == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert sl.engine_env((0,), "cpu") == {"SGLANG_USE_CPU_ENGINE": "1"}


def _launch(tmp_path: Path, code: str, port: int = 0, index: int = 0) -> sl.EngineLaunch:
    script = tmp_path / f"server{index}.py"
    script.write_text(textwrap.dedent(code))
    return sl.EngineLaunch(
        index=index,
        kind="embedded",
        argv=(sys.executable, str(script)),
        env={},
        host="127.0.0.1",
        port=port,
        api_key="k",
        log_path=tmp_path / f"engine-{index}.log",
    )


def test_start_failure_quotes_the_engine_log(tmp_path: Path) -> None:
    launch = _launch(
        tmp_path,
        """
        import sys
        print("loading weights from /m", flush=True)
        print("RuntimeError: CUDA out of memory", file=sys.stderr, flush=True)
        sys.exit(3)
    """,
    )
    with pytest.raises(sl.EngineStartError, match=r"(?s)exited with code 3.*CUDA out of memory"):
        sl.start_engines([launch], health_deadline_s=30)


def test_health_deadline_quotes_the_log(tmp_path: Path) -> None:
    launch = _launch(
        tmp_path,
        """
        import time
        print("still loading", flush=True)
        time.sleep(60)
    """,
        port=9,
    )
    t0 = time.monotonic()
    with pytest.raises(sl.EngineStartError, match=r"(?s)not healthy after 2 s.*still loading"):
        sl.start_engines([launch], health_deadline_s=2)
    assert time.monotonic() - t0 < 15


HEALTHY_SERVER = """
    import http.server, sys
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health_generate" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass
    print("serving", flush=True)
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_supervisor_restarts_a_killed_engine_and_reports_it(tmp_path: Path) -> None:
    from miles.job.ports import free_port

    port = free_port(0)
    base = _launch(tmp_path, HEALTHY_SERVER, port=port)
    launch = sl.EngineLaunch(**{**base.__dict__, "argv": (*base.argv, str(port))})
    engines = sl.start_engines([launch], health_deadline_s=30)
    rejoined: list[int] = []
    sup = sl.Supervisor(engines, health_deadline_s=30, poll_s=0.1, on_restart=lambda e: rejoined.append(e.starts))
    sup.start()
    try:
        first_pid = engines[0].pid
        engines[0].signal(signal.SIGKILL)
        assert sup.restarted_event.wait(30), engines[0].log_tail()
        assert sup.take_restarted() == [0] and sup.take_restarted() == []
        assert rejoined == [2] and engines[0].pid != first_pid and sl.health_ok(launch.url)
        assert engines[0].log_tail().count("===== miles: start") == 2
    finally:
        sup.stop()
        for e in engines:
            e.stop(timeout_s=5)
    assert not engines[0].alive()


def test_supervisor_gives_up_after_max_restarts(tmp_path: Path) -> None:
    launch = _launch(tmp_path, "import sys; print('bad config', flush=True); sys.exit(1)\n", port=9)
    eng = sl.EngineProcess(launch)
    eng.start()
    sup = sl.Supervisor([eng], health_deadline_s=5, poll_s=0.05, max_restarts=2)
    sup.start()
    deadline = time.monotonic() + 30
    while 0 not in sup.failed and time.monotonic() < deadline:
        time.sleep(0.05)
    sup.stop()
    assert "bad config" in sup.failed[0] and sup.restarts[0] <= 2


def test_every_model_dtype_is_an_sglang_dtype_choice() -> None:
    from typing import get_args, get_type_hints

    dtypes = get_args(get_type_hints(ModelConfig)["dtype"])
    assert dtypes
    choices = load_flags()["dtype"]["choices"]
    for dtype in dtypes:
        assert dtype in choices


def test_the_key_reaches_the_server_through_its_environment_never_its_command_line(tmp_path: Path) -> None:
    """A server started through ``KEY_FROM_ENV`` finds ``--api-key KEY`` in its own arguments, while its command
    line, which every user of the node can read in ``/proc/PID/cmdline``, holds no secret."""
    (tmp_path / "keyed_server.py").write_text(
        textwrap.dedent(
            """
            import sys, time
            print("args", sys.argv[1:], flush=True)
            time.sleep(60)
            """
        )
    )
    key = "0123456789abcdef-the-job-key"
    launch = sl.EngineLaunch(
        index=0,
        kind="sglang",
        argv=(sys.executable, "-c", KEY_FROM_ENV, "keyed_server", "--port", "1"),
        env={"PYTHONPATH": str(tmp_path)},
        host="127.0.0.1",
        port=9,
        api_key=key,
        log_path=tmp_path / "engine-0.log",
    )
    eng = sl.EngineProcess(launch)
    eng.start()
    try:
        deadline = time.monotonic() + 20
        while "args" not in launch.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert eng.pid is not None
        assert key.encode() not in Path(f"/proc/{eng.pid}/cmdline").read_bytes()
        log = launch.log_path.read_text()
        assert "args ['--port', '1', '--api-key', '<engine key>']" in log and key not in log
    finally:
        eng.stop(timeout_s=5)
