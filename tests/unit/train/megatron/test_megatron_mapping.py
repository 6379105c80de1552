"""Config translation and the HF <-> Megatron mapping tables: pure functions, no process group."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from miles.errors import UserError
from miles.plan.model import TrainerMesh
from miles.spec.tables import PerfConfig
from miles.train.megatron.config import arch_from_dict, padded_vocab_size
from miles.train.megatron.mapping import canonical_name, from_megatron, hf_shapes, param_rules, to_megatron

BASE = {
    "vocab_size": 95,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
FAMILIES = {
    "qwen2": {"model_type": "qwen2"},
    "qwen3": {"model_type": "qwen3", "head_dim": 16},
    "llama": {
        "model_type": "llama",
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "head_dim": 8,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "norm_topk_prob": True,
    },
}


def arch(family: str, **over: object):  # type: ignore[no-untyped-def]
    return arch_from_dict({**BASE, **FAMILIES[family], **over})


def mesh_of(perf: PerfConfig) -> TrainerMesh:
    """The smallest mesh of ``perf``'s sizes: one model replica, DP = EP (what the planner would derive)."""
    etp = perf.etp or perf.tp
    world = perf.tp * perf.pp * perf.cp * perf.ep
    return TrainerMesh(
        backend=perf.backend,
        tp=perf.tp,
        pp=perf.pp,
        cp=perf.cp,
        dp=perf.ep,
        ep=perf.ep,
        etp=etp,
        expert_dp=world // (etp * perf.ep * perf.pp),
        world_size=world,
    )


def test_family_features_are_read_from_config_json() -> None:
    assert arch("qwen2").qkv_bias and not arch("qwen2").qk_norm
    q3 = arch("qwen3")
    assert q3.qk_norm and not q3.qkv_bias and q3.head_dim == 16
    ll = arch("llama")
    assert ll.rope_scaling == {
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert ll.rope_theta == 500000.0
    moe = arch("qwen3_moe")
    assert (moe.num_experts, moe.moe_topk, moe.moe_ffn_hidden_size, moe.norm_topk_prob) == (4, 2, 16, True)
    # transformers 5 writes num_local_experts instead of num_experts
    assert arch("qwen3_moe", num_experts=None, num_local_experts=6).num_experts == 6
    # transformers 4 spelling of RoPE
    old = arch_from_dict({**BASE, "model_type": "llama", "rope_parameters": None, "rope_theta": 1e6})
    assert old.rope_theta == 1e6 and old.rope_scaling is None


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"model_type": "gpt2"}, "no Megatron mapping"),
        ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "llama", "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn'"),
        ({"model_type": "qwen3_moe", "num_experts": 4, "decoder_sparse_step": 2}, "dense layers"),
    ],
)
def test_unsupported_configs_are_user_errors(bad: dict[str, object], message: str) -> None:
    with pytest.raises(UserError, match=message):
        arch_from_dict({**BASE, **bad})


def test_transformer_config_translation() -> None:
    pytest.importorskip("megatron.core")
    from miles.train.megatron.config import transformer_config

    tp2 = PerfConfig(tp=2)
    c = transformer_config(arch("qwen2"), mesh_of(tp2), tp2, dtype=torch.bfloat16, use_te=False)
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups, c.kv_channels) == (2, 32, 4, 2, 8)
    assert c.add_qkv_bias and not c.add_bias_linear and not c.qk_layernorm and c.gated_linear_unit
    assert c.normalization == "RMSNorm" and c.layernorm_epsilon == 1e-6 and c.bf16
    assert c.tensor_model_parallel_size == 2 and c.calculate_per_token_loss
    moe = PerfConfig(ep=2, recompute_granularity="full")
    m = transformer_config(arch("qwen3_moe"), mesh_of(moe), moe, dtype=torch.float32, use_te=False)
    assert m.qk_layernorm and not m.add_qkv_bias
    assert (m.num_moe_experts, m.moe_router_topk, m.moe_ffn_hidden_size, m.expert_model_parallel_size) == (4, 2, 16, 2)
    assert m.moe_router_pre_softmax is False  # norm_topk_prob: softmax over the top-k only
    assert (m.recompute_granularity, m.recompute_method, m.recompute_num_layers) == ("full", "uniform", 1)


def _hf_tensors(a, seed: int = 0) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in hf_shapes(a).items()}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("tp", [1, 2])
def test_mapping_round_trip_and_shapes(family: str, tp: int) -> None:
    a = arch(family)
    hf = _hf_tensors(a)
    rules = param_rules(a)
    covered = {n for r in rules for n in r.hf}
    assert covered == set(hf), "every HF tensor is mapped exactly once"
    q_rows = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
    for rule in rules:
        shards = [to_megatron(rule, [hf[n] for n in rule.hf], a, r, tp) for r in range(tp)]
        leaf = rule.mcore.rsplit(".", 2)[-2] + "." + rule.mcore.rsplit(".", 1)[-1]
        if leaf == "linear_qkv.weight":
            assert shards[0].shape == (q_rows // tp, a.hidden_size)
        elif leaf == "word_embeddings.weight":
            assert shards[0].shape == (padded_vocab_size(a, tp) // tp, a.hidden_size)
        elif leaf == "linear_proj.weight":
            assert shards[0].shape == (a.hidden_size, a.num_heads * a.head_dim // tp)
        back = from_megatron(rule, shards, a)
        for name, t in zip(rule.hf, back, strict=True):
            assert torch.equal(t, hf[name]), (rule.mcore, name)


def test_qkv_layout_is_grouped_by_query_group() -> None:
    """Megatron's fused QKV: per KV group, its query heads, then its key head, then its value head."""
    a = dataclasses.replace(arch("llama"), hidden_size=1, num_heads=4, num_kv_heads=2, head_dim=1)
    rule = next(r for r in param_rules(a) if r.mcore.endswith("linear_qkv.weight"))
    q = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    k = torch.tensor([[10.0], [11.0]])
    v = torch.tensor([[20.0], [21.0]])
    full = to_megatron(rule, [q, k, v], a, 0, 1).flatten().tolist()
    assert full == [0, 1, 10, 20, 2, 3, 11, 21]
    assert to_megatron(rule, [q, k, v], a, 1, 2).flatten().tolist() == [2, 3, 11, 21]


def test_gate_up_shards_hold_their_own_halves() -> None:
    a = dataclasses.replace(arch("qwen2"), ffn_hidden_size=4, hidden_size=1)
    rule = next(r for r in param_rules(a) if r.mcore.endswith("mlp.linear_fc1.weight"))
    gate = torch.arange(4.0).reshape(4, 1)
    up = torch.arange(10.0, 14.0).reshape(4, 1)
    assert to_megatron(rule, [gate, up], a, 1, 2).flatten().tolist() == [2, 3, 12, 13]


def test_tied_embeddings_are_exported_once_and_loaded_twice() -> None:
    a = arch("qwen2", tie_word_embeddings=True)
    rules = param_rules(a)
    assert "lm_head.weight" not in {n for r in rules for n in r.hf}
    assert rules[0].aliases == ("output_layer.weight",)


def test_canonical_names_use_global_layer_and_expert_indices() -> None:
    name = "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"
    assert canonical_name(name, {0: 2, 1: 3}, 4) == "decoder.layers.3.mlp.experts.4.linear_fc1.weight"
    assert canonical_name("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", {0: 5}, 0) == (
        "decoder.layers.5.input_layernorm.weight"
    )
    assert canonical_name("embedding.word_embeddings.weight", {}, 0) == "embedding.word_embeddings.weight"


def test_llama3_frequencies_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from miles.train.megatron.model import llama3_inv_freq

    a = arch("llama")
    cfg = LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **a.rope_scaling},
    )
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float32) / a.head_dim))
    assert torch.allclose(llama3_inv_freq(base, a.rope_scaling), ref.float(), rtol=1e-6, atol=0)


def test_megatron_on_cpu_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from miles.spec.tables import Spec, TrainConfig
    from miles.train.actor import ActorConfig, TrainerContext
    from miles.train.megatron import build_megatron_actor

    monkeypatch.delattr(torch.cuda, "miles_cpu_shim", raising=False)
    cfg = ActorConfig.from_spec(Spec(train=TrainConfig(global_batch_size=4, num_steps_per_rollout=1)))
    with pytest.raises(UserError, match='needs CUDA GPUs.*backend = "fsdp"'):
        build_megatron_actor(cfg, TrainerContext(model_dir=str(tmp_path), num_rollout=1, device=torch.device("cpu")))
