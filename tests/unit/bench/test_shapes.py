"""Model shapes, FLOPs and the card tables the benchmarks divide by."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miles.bench.hardware import card_for, memory_bandwidth_gbs, peak_tflops
from miles.bench.shapes import (
    PRESETS,
    load_config_dict,
    param_count,
    scale_layers,
    tensor_specs,
    train_flops_per_token,
    with_layers,
)
from miles.errors import UserError


@pytest.mark.parametrize(
    ("preset", "params"),
    [
        ("qwen2.5-0.5b", 494_032_768),  # the published parameter counts of these checkpoints
        ("qwen2.5-1.5b", 1_543_714_304),
        ("qwen2.5-3b", 3_085_938_688),
        ("qwen2.5-7b", 7_615_616_512),
        ("llama3.2-1b", 1_235_814_400),
        ("smollm2-135m", 134_515_008),
        ("qwen3-8b", 8_190_735_360),
        ("llama3-8b", 8_030_261_248),
    ],
)
def test_presets_have_the_published_parameter_counts(preset: str, params: int) -> None:
    assert param_count(PRESETS[preset]) == params


def test_tensor_specs_are_the_actors_names(tiny_config: Path) -> None:
    names = [t.name for t in tensor_specs(load_config_dict(str(tiny_config), None))]
    assert names[0] == "model.embed_tokens.weight"
    assert "model.layers.1.mlp.down_proj.weight" in names
    assert "lm_head.weight" not in names  # tied: sent once, under the embedding's name


def test_scale_layers_reaches_the_size_within_one_layer(tiny_config: Path) -> None:
    data = load_config_dict(str(tiny_config), None)
    per_layer = (param_count(with_layers(data, 2)) - param_count(with_layers(data, 1))) * 2
    target = 5 << 20
    scaled = scale_layers(data, target, element_size=2)
    assert abs(param_count(scaled) * 2 - target) <= per_layer / 2 + 1
    assert scaled["hidden_size"] == data["hidden_size"]


def test_with_layers_repeats_per_layer_lists(tiny_config: Path) -> None:
    data = json.loads(tiny_config.read_text())
    assert len(data["layer_types"]) == 2
    assert with_layers(data, 5)["layer_types"] == [data["layer_types"][0]] * 5
    assert param_count(with_layers(data, 5)) > param_count(data)


def test_flops_per_token_by_hand(tiny_config: Path) -> None:
    data = load_config_dict(str(tiny_config), None)
    # layer: q 32x32+32, k/v 2 x (32x16+16), o 32x32, mlp 3 x 32x64, 2 norms x 32; final norm 32; head 96x32 (tied)
    layer = (32 * 32 + 32) + 2 * (32 * 16 + 16) + 32 * 32 + 3 * 32 * 64 + 2 * 32
    n = 2 * layer + 32 + 96 * 32
    attn = 12 * 2 * 4 * 8 * 128
    assert train_flops_per_token(data, 128) == 6 * n + attn


def test_unknown_preset_and_missing_config_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="qwen2.5-0.5b"):
        load_config_dict(None, "gpt-17")
    with pytest.raises(UserError, match="cannot read"):
        load_config_dict(str(tmp_path / "nope.json"), None)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="model_type"):
        load_config_dict(str(tmp_path), None)
    with pytest.raises(UserError, match="either"):
        load_config_dict(str(tmp_path), "qwen2.5-0.5b")


@pytest.mark.parametrize(
    ("name", "card", "tflops", "bw"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0, 3350.0),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.0, 2000.0),
        ("NVIDIA H200", "H200", 989.0, 4800.0),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM", 312.0, 2039.0),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB", 312.0, 1555.0),
    ],
)
def test_card_table(name: str, card: str, tflops: float, bw: float) -> None:
    c = card_for(name)
    assert c is not None and (c.name, c.bf16_tflops, c.mem_bw_gbs) == (card, tflops, bw)


def test_cpu_peak_is_unknown_and_bandwidth_is_measured() -> None:
    assert peak_tflops("cpu", "float32", None) == (None, "unknown (pass --peak-tflops)")
    assert peak_tflops("cpu", "float32", 1.5) == (1.5, "flag")
    bw, source = memory_bandwidth_gbs("cpu", None)
    assert bw > 0 and source.startswith("measured")
