"""Fixtures of the embedded-engine tests (a tiny random Qwen2 with a locally built tokenizer, and its engine), and
W&B's own files kept inside the test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

WANDB_HOME_VARS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")


@pytest.fixture(scope="session", autouse=True)
def _wandb_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """W&B's logs, cache and settings go to a temporary folder, never the user's home; the runs of tests that set
    ``[run] use_wandb`` write into their own run directories, offline (the subprocesses inherit this)."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as mp:
        for var in WANDB_HOME_VARS:
            mp.setenv(var, str(home))
        mp.delenv("WANDB_API_KEY", raising=False)
        yield


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
