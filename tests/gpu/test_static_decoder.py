"""The static decoder on a real model shape: CUDA-graph decode against itself, its eager run and HF's forward.

A Qwen2.5-0.5B-shaped model (4 layers, random weights, the 151,936-token
vocabulary) with a mix of requests as a rollout sends them: greedy and
sampled rows with their own seeds, top-k / top-p, stop tokens with a minimum
length, prompt log-probs on some rows. The engine promises reproducible
rollouts, so the graphs must give the same tokens twice, and the same tokens
as the same decoder launched eagerly (float32; bf16 prints the agreement).
HF's forward (the engine's fallback path, same sampler and seeds) computes the
same function in another rounding order: a sampled token can flip where the
draw falls within rounding of a boundary of the cumulative distribution (a
random model's distribution over 151,936 tokens is nearly flat, so this is not
rare), and the row differs from there on. So against HF the test compares what
rounding cannot flip: over the prefix each row shares with HF's, where the
contexts are equal, the log-probs agree to float32 precision.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from miles.bench.rollout import write_model_dir
from miles.bench.shapes import load_config_dict, with_layers
from miles.engine.core import Engine, GenerationRequest
from miles.engine.decoder import StaticDecoder
from miles.engine.sampling import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)"),
]

ROWS = 40


def _requests(vocab: int) -> list[GenerationRequest]:
    rng = random.Random(1)
    out = []
    for i in range(ROWS):
        kw: dict[str, Any] = {
            "max_new_tokens": rng.randrange(1, 48),
            "temperature": rng.choice([0.0, 0.0, 0.8, 1.0]),
            "sampling_seed": 100 + i,
        }
        if i % 3 == 0:
            kw.update(top_k=rng.choice([-1, 20]), top_p=rng.choice([1.0, 0.9]))
        if i % 4 == 0:
            kw.update(stop_token_ids=[rng.randrange(3, vocab)], min_new_tokens=min(2, kw["max_new_tokens"]))
        else:
            kw.update(ignore_eos=True)
        ids = [rng.randrange(3, vocab) for _ in range(rng.randrange(2, 40))]
        out.append(GenerationRequest(ids, SamplingParams(**kw), logprob_start_len=0 if i % 5 == 0 else -1))
    return out


def _agreement(a: list[Any], b: list[Any]) -> tuple[int, float]:
    """(rows with equal tokens, max |logprob difference| over those rows)."""
    equal = [(x, y) for x, y in zip(a, b, strict=True) if x.output_ids == y.output_ids]
    lp = max(
        (abs(p - q) for x, y in equal for p, q in zip(x.output_logprobs, y.output_logprobs, strict=True)), default=0.0
    )
    return len(equal), lp


def _prefix_agreement(a: list[Any], b: list[Any]) -> tuple[int, float]:
    """(tokens on the common prefixes of each row pair, max |logprob difference| over them)."""
    tokens, lp = 0, 0.0
    for x, y in zip(a, b, strict=True):
        n = 0
        while n < min(len(x.output_ids), len(y.output_ids)) and x.output_ids[n] == y.output_ids[n]:
            n += 1
        tokens += n
        lp = max([lp, *(abs(p - q) for p, q in zip(x.output_logprobs[:n], y.output_logprobs[:n], strict=True))])
    return tokens, lp


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graphs_reproduce_and_equal_eager_and_hf(tmp_path: Path, dtype: str) -> None:
    data = with_layers(load_config_dict(None, "qwen2.5-0.5b"), 4)
    engine = Engine(
        write_model_dir(data, tmp_path / "model", dtype), device="cuda:0", dtype=dtype, seed=0, max_batch_size=64
    )
    requests = _requests(int(engine.vocab_size))
    graphs = engine.generate(requests)
    again = engine.generate(requests)
    decoder = engine.decoder
    assert decoder is not None and decoder.cuda_graphs
    assert [o.output_ids for o in again] == [o.output_ids for o in graphs]
    engine.decoder = StaticDecoder(engine.model, engine.device, cuda_graphs=False, fuse=decoder.fusion.on)
    eager = engine.generate(requests)
    engine.decoder = None  # HF's forward
    hf = engine.generate(requests)
    engine.decoder = decoder
    eager_rows, eager_lp = _agreement(graphs, eager)
    hf_rows, hf_lp = _agreement(graphs, hf)
    print(
        f"{dtype}: graphs vs eager {eager_rows}/{ROWS} rows equal (max |logprob diff| {eager_lp:.2e}); "
        f"vs HF forward {hf_rows}/{ROWS} (max |logprob diff| {hf_lp:.2e})"
    )
    reasons = {o.finish_reason["type"] for o in graphs}
    assert "length" in reasons, reasons
    if dtype == "float32":
        assert eager_rows == ROWS and eager_lp < 1e-4
        shared, prefix_lp = _prefix_agreement(graphs, hf)
        print(f"float32: {shared} tokens on the prefixes shared with HF's forward, max |logprob diff| {prefix_lp:.2e}")
        assert shared > 0 and prefix_lp < 1e-3
