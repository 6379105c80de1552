"""The static decode path (miles/engine/decoder.py) generates what HF's forward generates, token for token."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from miles.engine import core as engine_mod
from miles.engine.core import Engine, GenerationOutput, GenerationRequest
from miles.engine.decoder import StaticDecoder
from miles.engine.sampling import SamplingParams


def _mixed_requests(vocab: int, n: int, seed: int = 0) -> list[GenerationRequest]:
    """Greedy and sampled rows, top-k/top-p, stop ids with min_new_tokens, EOS, prompt logprobs, varied lengths."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        kw: dict[str, object] = {
            "max_new_tokens": rng.randrange(1, 30),
            "sampling_seed": 100 + i,
            "temperature": rng.choice([0.0, 0.7, 1.0]),
        }
        if i % 3 == 0:
            kw.update(top_k=rng.choice([-1, 5]), top_p=rng.choice([1.0, 0.8]))
        if i % 4 == 0:
            kw.update(stop_token_ids=[rng.randrange(3, vocab)], min_new_tokens=min(3, int(kw["max_new_tokens"])))  # type: ignore[call-overload]
        if i % 5 == 0:
            kw.update(ignore_eos=True)
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 14))]
        reqs.append(GenerationRequest(prompt, SamplingParams(**kw), logprob_start_len=1 if i % 6 == 0 else -1))  # type: ignore[arg-type]
    return reqs


def _assert_same(a: list[GenerationOutput], b: list[GenerationOutput]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.output_ids == y.output_ids
        assert x.finish_reason == y.finish_reason
        assert x.text == y.text
        assert x.output_logprobs == pytest.approx(y.output_logprobs, abs=2e-5)
        assert len(x.input_logprobs) == len(y.input_logprobs)
        assert x.input_logprobs == pytest.approx(y.input_logprobs, abs=2e-5)


def test_static_path_equals_hf_forward_and_survives_rehearsed_captures(tiny_model_dir: Path) -> None:
    """Windows, batch buckets, compaction and the graph warm-up (run and undone at each new key) change nothing."""
    fast = Engine(tiny_model_dir, seed=0, max_batch_size=64)
    slow = Engine(tiny_model_dir, seed=0, max_batch_size=64, decoder="hf")
    assert fast.decoder is not None and slow.decoder is None
    fast.decoder.rehearse = True
    reqs = _mixed_requests(fast.vocab_size, 37)
    out = fast.generate(reqs)
    _assert_same(out, slow.generate(reqs))
    assert len(fast.decoder.rehearsed) >= 3  # several buckets/windows were visited
    assert {o.finish_reason["type"] for o in out} == {"stop", "length"}
    _assert_same(out, fast.generate(reqs))  # a second batch reuses the workspace


def test_fused_layer_order_equals_the_plain_forward(tiny_model_dir: Path) -> None:
    """The fused forward's order (each residual add with the norm after it, SiLU x up, RoPE as one function) run
    eagerly gives HF's outputs; on CUDA the same functions are compiled (tests/gpu/test_engine_graphs.py)."""
    fused = Engine(tiny_model_dir, seed=0, max_batch_size=32)
    slow = Engine(tiny_model_dir, seed=0, max_batch_size=32, decoder="hf")
    assert fused.decoder is not None and not fused.decoder.fusion.on
    fused.decoder.fused_layers = True
    reqs = _mixed_requests(fused.vocab_size, 21, seed=4)
    out = fused.generate(reqs)
    assert fused.decoder.fusable  # the tiny Qwen2 model takes the fused path
    _assert_same(out, slow.generate(reqs))
    with pytest.raises(RuntimeError, match="cannot fuse the decode step: .*CUDA"):
        fused.decoder.set_fusion(True)


def test_reading_every_step_or_every_few_steps_gives_the_same_outputs(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = Engine(tiny_model_dir, seed=0, max_batch_size=16)
    reqs = _mixed_requests(eng.vocab_size, 12, seed=1)
    lazy = eng.generate(reqs)
    monkeypatch.setattr(engine_mod, "SYNC_EVERY", 1)
    _assert_same(lazy, eng.generate(reqs))


def test_weight_updates_reach_the_packed_copies(tiny_model_dir: Path) -> None:
    fast = Engine(tiny_model_dir, seed=0)
    slow = Engine(tiny_model_dir, seed=0, decoder="hf")
    reqs = _mixed_requests(fast.vocab_size, 6, seed=2)
    before = fast.generate(reqs)
    for eng in (fast, slow):
        state = eng.state()
        eng.load_weights(
            [
                (name, state[name] * 1.5)
                for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight")
            ]
        )
    after = fast.generate(reqs)
    _assert_same(after, slow.generate(reqs))
    assert [o.output_ids for o in after] != [o.output_ids for o in before]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_other_llama_family_decoders(tiny_model_dir: Path, tmp_path: Path, family: str) -> None:
    """No q/k/v bias (llama) and per-head q/k norms (qwen3) decode as HF's forward does."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    base = Engine(tiny_model_dir, seed=0).config
    common = dict(
        vocab_size=base.vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
    )
    cfg = LlamaConfig(**common) if family == "llama" else Qwen3Config(head_dim=24, **common)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    for f in tiny_model_dir.iterdir():
        if "token" in f.name:
            shutil.copy(f, tmp_path / f.name)
    fast = Engine(tmp_path, seed=0, decoder="static")
    slow = Engine(tmp_path, seed=0, decoder="hf")
    reqs = _mixed_requests(fast.vocab_size, 9, seed=3)
    _assert_same(fast.generate(reqs), slow.generate(reqs))


def test_unsupported_models_fall_back_to_hf_forward() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=32))
    assert "gpt2" in str(StaticDecoder.unsupported(model))


def test_two_level_inverse_cdf_picks_what_a_full_scan_picks() -> None:
    from miles.engine.sampling import _inverse_cdf, cdf_block

    assert (cdf_block(151936), cdf_block(32000), cdf_block(20), cdf_block(4099)) == (128, 160, 0, 0)
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(512, 4096, generator=gen) * 4, dim=-1)
    probs[:, 1000:1500] = 0.0  # zero-mass runs, as after top-k
    u = torch.rand(512, generator=gen)
    u[:2] = torch.tensor([0.0, 1.0 - 2**-24])
    full, two = _inverse_cdf(probs, u, 0), _inverse_cdf(probs, u, cdf_block(4096))
    assert (full == two).float().mean() >= 0.995  # only float rounding at a boundary may differ
    assert bool((probs.gather(1, two) > 0).all())
