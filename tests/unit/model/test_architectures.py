"""The torch-free architecture lists agree with the code that loads models: the Megatron mapping and transformers."""

from __future__ import annotations

import typing

import pytest

from miles.errors import UserError
from miles.model.architectures import MEGATRON_FAMILIES, causal_lm_types, support

BASE = {
    "vocab_size": 95,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
}


def test_megatron_families_are_what_the_mapping_builds() -> None:
    from miles.train.megatron.config import FAMILIES, Family, arch_from_dict
    from miles.train.megatron.mapping import param_rules

    assert FAMILIES == MEGATRON_FAMILIES == typing.get_args(Family)
    for family in MEGATRON_FAMILIES:
        rules = param_rules(arch_from_dict({**BASE, "model_type": family}))
        assert any(r.mcore.endswith("linear_qkv.weight") for r in rules), family
        assert support({"model_type": family}, "megatron", "embedded", False) == ([], [])
    for other in ("mistral", "gpt2", "gemma"):
        with pytest.raises(UserError, match="has no Megatron mapping"):
            arch_from_dict({**BASE, "model_type": other})
        problems, _ = support({"model_type": other}, "megatron", "embedded", False)
        assert len(problems) == 1 and "has no Megatron mapping" in problems[0]


def test_causal_lm_types_are_read_from_transformers_without_importing_it() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert causal_lm_types() == dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    problems, _ = support(
        {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, "fsdp", "embedded", False
    )
    assert "is not a causal LM" in problems[0]
    assert '[perf] backend = "fsdp" and [rollout] engine = "embedded"' in problems[0]
    problems, _ = support({"model_type": "t5"}, "megatron", "sglang", False)
    assert all("AutoModelForCausalLM" not in p for p in problems)  # Megatron and SGLang load models their own way
