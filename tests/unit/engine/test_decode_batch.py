"""The two decode paths behind DecodeBatch step the same rows to the same tokens, compacted or not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from miles.engine.core import Engine
from miles.engine.decode_batch import DecodeBatch, HFBatch, StaticBatch
from miles.engine.sampling import BatchSampling, SamplingParams

STEPS = 6
PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]


def _batches(engine: Engine) -> tuple[DecodeBatch, DecodeBatch]:
    params = [SamplingParams(max_new_tokens=STEPS, temperature=t, sampling_seed=3) for t in (0.0, 1.0, 0.7)]
    sampling = BatchSampling.build(params, [3, 4, 5], [STEPS] * 3, set(), engine.vocab_size, STEPS)
    want = [True, False, True]
    assert engine.decoder is not None
    static = StaticBatch(engine.decoder, PROMPTS, sampling, want, max(map(len, PROMPTS)) + STEPS)
    hf = HFBatch(
        engine.model, engine._cache_kw, engine.device, engine.pad_id, PROMPTS, sampling.to(engine.device), want, STEPS
    )
    return static, hf


@torch.inference_mode()
def test_static_and_hf_batches_agree(tiny_model_dir: Path) -> None:
    engine = Engine(tiny_model_dir, seed=0)
    static, hf = _batches(engine)
    assert static.rows == 4 and hf.rows == 3  # the static path pads to a power-of-two bucket
    assert static.bucket(3) == 4 and hf.bucket(3) == 3
    for row in (0, 2):
        assert static.input_logprobs[row] == pytest.approx(hf.input_logprobs[row], abs=2e-5)
    longest = max(map(len, PROMPTS))
    for step in range(2):
        static.step(static.rows, longest + step)
        hf.step(hf.rows, longest + step)
    assert static.read(3, 0, 2)[0][:3] == hf.read(3, 0, 2)[0]
    # compaction: rows 2 and 0 go on alone, in that order, and keep their own draws and caches
    static.keep(static.rows, [2, 0], 2)
    hf.keep(hf.rows, [2, 0], 2)
    for step in range(2, STEPS):
        static.step(2, longest + step)
        hf.step(2, longest + step)
    s_tokens, s_lps = static.read(2, 0, STEPS)
    h_tokens, h_lps = hf.read(2, 0, STEPS)
    assert s_tokens == h_tokens
    for s_row, h_row in zip(s_lps, h_lps, strict=True):
        assert s_row == pytest.approx(h_row, abs=2e-5)
