"""A custom reward for tests/unit/spec/test_key_effects.py: scores a sample, or a group of samples, by length."""

from __future__ import annotations

from typing import Any


def score(args: Any, sample: Any) -> Any:
    if isinstance(sample, list):
        return [float(len(s.response_ids)) for s in sample]
    return float(len(sample.response_ids))
