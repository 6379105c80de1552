"""Fixtures of the weight-sync tests: a tiny random Qwen2 HF directory."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from miles.model.builtin import materialize

    return materialize("tiny-arith", tmp_path_factory.mktemp("sync-model") / "tiny", seed=0)
