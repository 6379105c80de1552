"""The committed ``miles/spec/sglang_flags.json`` is exactly what the pinned SGLang wheel declares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miles.sglang import flags as sglang_flags
from miles.sglang.wheel import pinned_wheel


@pytest.fixture(scope="module")
def generated() -> dict:
    return sglang_flags.flags_from_wheel(pinned_wheel())


def test_committed_flags_equal_the_pinned_wheel(generated: dict) -> None:
    committed = sglang_flags.FLAGS_PATH.read_text()
    assert generated["version"] == sglang_flags.SGLANG_PIN
    assert committed == sglang_flags.render(generated), (
        "miles/spec/sglang_flags.json is stale: run "
        "`python -m miles.sglang.flags --wheel .cache/sglang/sglang-<pin>-*.whl`"
    )


def test_flags_describe_the_launch_flags_miles_relies_on(generated: dict) -> None:
    flags = generated["flags"]
    # Every flag the launcher writes itself must exist in the pinned release with the type it passes.
    assert flags["model_path"]["type"] == "str"
    assert flags["tp_size"]["type"] == "int" and "tensor_parallel_size" in flags["tp_size"]["aliases"]
    assert flags["mem_fraction_static"]["type"] == "float"
    assert flags["api_key"]["type"] == "str"
    assert flags["port"] == {"default": 30000, "type": "int"}
    assert flags["base_gpu_id"]["type"] == "int"
    assert "torch_native" in flags["attention_backend"]["choices"]
    assert flags["skip_server_warmup"] == {"default": False, "type": "bool"}
    # A BooleanOptionalAction flag can be turned off explicitly.
    assert flags["dllm_fdfo"]["negatable"] is True
    # Deprecated spellings are still accepted, and marked.
    assert flags["disable_cuda_graph"]["deprecated"] is True
    types = {e["type"] for e in flags.values()}
    assert types <= {"int", "float", "str", "bool", "list", "json"}
    assert all("item_type" in e for e in flags.values() if e["type"] == "list")
    assert len(flags) > 300


def test_generator_cli_writes_the_file_atomically(tmp_path: Path, generated: dict) -> None:
    out = tmp_path / "flags.json"
    assert sglang_flags.main(["--wheel", str(pinned_wheel()), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == generated
    assert [p.name for p in tmp_path.iterdir()] == ["flags.json"]


def test_closest_flag_and_aliases() -> None:
    flags = sglang_flags.load_flags()
    assert sglang_flags.closest_flag("mem_fraction_statc", flags) == "mem_fraction_static"
    assert sglang_flags.alias_map(flags)["tensor_parallel_size"] == "tp_size"
