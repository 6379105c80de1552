"""The engine rank's launch (``task_launch``): one path for SGLang and the embedded engine, pinned to the plan's
GPUs.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from miles.job.environment import Layout, TaskContext, task_context
from miles.launch import engine_host
from miles.plan.engine_argv import KEY_FROM_ENV
from miles.spec.tables import ModelConfig, RolloutConfig, SglangConfig, Spec

LAYOUT = Layout(
    mode="colocate",
    trainer_world_size=4,
    num_engines=2,
    master_port=21000,
    weight_update_port=21002,
    engine_http_ports=(0, 0),
    engine_tp=2,
    engine_nccl_ports=(0, 0),
    engine_gpus=((0, 1), (2, 3)),
)
"""Two TP-2 engines colocated with four trainer ranks on one 4-GPU node (ports 0: any free one)."""


def _ctx(tmp_path: Path, engine: int, device: str) -> TaskContext:
    env = {
        "RANK": str(engine),
        "WORLD_SIZE": "2",
        "LOCAL_RANK": str(engine),
        "MILES_ENGINE_HOST": "node7",
        "MILES_LAUNCH_ID": "t",
    }
    return task_context(env, LAYOUT, role="engine", run_dir=tmp_path, cuda_available=device == "cuda")


@pytest.mark.parametrize("kind", ["sglang", "embedded"])
def test_each_engine_sees_only_its_gpus_from_the_plan(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MILES_SGLANG_PYTHON", "/opt/sglang/bin/python")
    monkeypatch.setenv("MILES_ENGINE_API_KEY", "k")
    spec = Spec(
        model=ModelConfig(hf_checkpoint="/models/m", dtype="bfloat16"),
        rollout=RolloutConfig(engine=kind),
        sglang=SglangConfig(rollout_num_gpus_per_engine=2),
    )  # type: ignore[arg-type]
    launch = engine_host.task_launch(spec, _ctx(tmp_path, 1, "cuda"))
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert launch.url == f"http://node7:{launch.port}" and launch.host == "0.0.0.0"
    assert launch.log_path == tmp_path / "logs" / "engine-1.log"
    argv = list(launch.argv)
    assert launch.api_key == "k" and "k" not in argv  # the key travels in the environment, not the command line
    if kind == "sglang":
        assert argv[0] == "/opt/sglang/bin/python" and argv[1:4] == ["-c", KEY_FROM_ENV, "sglang.launch_server"]
        assert argv[argv.index("--tp-size") + 1] == "2" and "--nccl-port" in argv
    else:
        assert argv[1:3] == ["-m", "miles.engine.server"] and argv[argv.index("--device") + 1] == "cuda"


def test_cpu_sglang_engine_gets_the_cpu_switch_and_free_ports(tmp_path: Path) -> None:
    spec = Spec(
        model=ModelConfig(hf_checkpoint="/models/m", dtype="float32"),
        rollout=RolloutConfig(engine="sglang"),
        sglang=SglangConfig(server_args={"device": "cpu", "attention_backend": "torch_native"}),
    )
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        port = taken.getsockname()[1]
        ctx = task_context(
            {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MILES_LAUNCH_ID": "t", "MILES_ENGINE_PORT": str(port)},
            LAYOUT,
            role="engine",
            run_dir=tmp_path,
        )
        launch = engine_host.task_launch(spec, ctx)
    assert launch.env == {"SGLANG_USE_CPU_ENGINE": "1"}
    assert launch.port != port, "a port another process holds must be replaced by a free one"
    argv = list(launch.argv)
    assert argv[argv.index("--device") + 1] == "cpu"
