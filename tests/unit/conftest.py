"""Fixtures of the embedded-engine tests: a tiny random Qwen2 with a locally built tokenizer, and its engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Qwen2 (random weights, seed 0) with a character-level tokenizer, as an HF directory."""
    from miles.model.builtin import materialize

    return materialize("tiny-arith", tmp_path_factory.mktemp("engine-model") / "tiny", seed=0)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from miles.engine.core import Engine

    torch.set_num_threads(1)
    return Engine(tiny_model_dir, seed=0, max_batch_size=8)
