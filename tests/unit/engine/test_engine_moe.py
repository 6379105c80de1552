"""The engine takes and reports weights under checkpoint names when transformers fuses them (Qwen3-MoE)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from miles.engine.core import Engine, GenerationRequest
from miles.engine.sampling import SamplingParams
from miles.model.checkpoint_names import to_checkpoint_names
from miles.transfer.checksum import tensor_checksum


def _moe(vocab: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(
        Qwen3MoeConfig(
            vocab_size=vocab,
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
    )


def test_checkpoint_named_moe_weights_load_and_verify(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "moe"
    model_dir.mkdir()
    for f in tiny_model_dir.iterdir():  # the tokenizer of the tiny model, a MoE body
        if f.suffix in (".json", ".txt") and f.name != "config.json":
            (model_dir / f.name).write_bytes(f.read_bytes())
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    _moe(vocab, seed=0).save_pretrained(model_dir)
    engine = Engine(model_dir, seed=0, max_batch_size=4)

    source = _moe(vocab, seed=1)
    sent = dict(to_checkpoint_names(source, ((n, p.detach()) for n, p in source.named_parameters())))
    assert "model.layers.1.mlp.experts.2.up_proj.weight" in sent
    assert engine.load_weights(sent.items()) == len(sent)
    held = engine.checksums()
    assert {n: held.get(n) for n in sent} == {n: tensor_checksum(t) for n, t in sent.items()}
    for name, p in source.state_dict().items():  # the fused parameters now equal the source's
        assert torch.equal(engine.model.state_dict()[name], p), name

    ids = engine.tokenizer("12=").input_ids
    out = engine.generate([GenerationRequest(ids, SamplingParams(max_new_tokens=3, temperature=0.0))])
    assert len(out[0].output_ids) == 3
