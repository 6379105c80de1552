"""The HF directory a run's actor and engines both load: the user's checkpoint, or a built-in written once."""

from __future__ import annotations

from pathlib import Path

from miles.model.builtin import materialize


def model_dir(*, builtin: str | None, hf_checkpoint: str | None, run_dir: str | Path, seed: int, dtype: str) -> str:
    """``hf_checkpoint``, or the built-in ``builtin`` materialized under ``<run_dir>/model`` (seeded, so every
    process that asks writes or finds the same weights)."""
    if builtin:
        return str(materialize(builtin, Path(run_dir) / "model", seed=seed, dtype=dtype))
    assert hf_checkpoint, "the spec's field rules require hf_checkpoint or builtin"
    return hf_checkpoint
