"""Checkpoint names in and out of models whose transformers layout fuses parameters (Qwen3-MoE)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3MoeConfig

from miles.model.checkpoint_names import FusedTargets, conversions, to_checkpoint_names


def _moe(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(cfg)


def test_moe_names_match_save_pretrained(tmp_path: Path) -> None:
    model = _moe(0)
    assert conversions(model), "transformers should fuse Qwen3-MoE experts"
    model.save_pretrained(tmp_path)
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    exported = dict(to_checkpoint_names(model, ((n, p.detach()) for n, p in model.named_parameters())))
    assert set(exported) == set(on_disk)
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in exported
    for name, t in on_disk.items():
        assert torch.equal(exported[name], t), name


def test_engine_side_loads_checkpoint_names_into_fused_parameters(tmp_path: Path) -> None:
    source, target = _moe(0), _moe(1)
    ckpt = dict(to_checkpoint_names(source, ((n, p.detach()) for n, p in source.named_parameters())))
    targets = FusedTargets(target)
    state = target.state_dict()
    with torch.no_grad():
        for name, t in ckpt.items():
            where = targets.locate(name)
            if where is None:
                state[name].copy_(t)
            else:
                fused, idx = where
                assert idx.shape == t.shape
                state[fused].view(-1)[idx.reshape(-1)] = t.reshape(-1)
    for name, p in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], p), name
    assert targets.locate("model.layers.0.self_attn.q_proj.weight") is None
    assert targets.locate("model.layers.0.mlp.experts.9.up_proj.weight") is None  # no such expert


def test_dense_models_pass_through() -> None:
    model = AutoModelForCausalLM.from_config(
        Qwen2Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    named = list(model.named_parameters())
    assert list(to_checkpoint_names(model, iter(named))) == named
    assert not FusedTargets(model).enabled


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "lm_head.weight"])
def test_non_layer_weights_keep_their_names(name: str) -> None:
    model = _moe(0)
    exported = dict(to_checkpoint_names(model, ((n, p.detach()) for n, p in model.named_parameters())))
    assert name in exported
