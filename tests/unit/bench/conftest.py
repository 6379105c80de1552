"""A tiny Qwen2 shape (config.json only: the benchmarks make their own random weights)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """config.json of a 2-layer Qwen2, hidden 32, vocab 96, tied embeddings."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("bench-config") / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return path


def positive_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def load_report(path: Path, suite: str) -> dict[str, Any]:
    """The JSON report, checked for the fields every suite writes."""
    report = json.loads(path.read_text())
    assert report["suite"] == suite
    for key in ("date", "command", "machine", "settings", "rows", "summary", "notes"):
        assert key in report, key
    assert report["machine"]["cpus"] >= 1 and report["machine"]["device"] == "cpu"
    assert report["rows"], "no rows"
    return report
