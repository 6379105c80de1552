"""The frozen reference model's directory (``[ckpt] ref_load``): an HF directory, never a Megatron checkpoint.

Miles recipes pass ``--ref-load`` a Megatron ``torch_dist`` checkpoint (the base model converted for Megatron).
miles builds the reference the way it builds the actor, from an HF directory, so such a directory must be refused
with the fix before any process reads it as HF files (it has no config.json, and its tensors carry Megatron names).
"""

from __future__ import annotations

from pathlib import Path

MEGATRON_MARKERS = ("latest_checkpointed_iteration.txt", ".metadata", "common.pt", "metadata.json")
"""Files at the top of a Megatron checkpoint directory (the tracker file, or a ``torch_dist`` iteration's own)."""

REF_LOAD_FIX = (
    "miles builds the reference from an HF directory: point ref_load at the HF model the Megatron checkpoint was "
    "converted from (or convert it back to HF), or leave ref_load empty to use the initial weights"
)


def megatron_checkpoint_sign(path: str | Path) -> str | None:
    """What marks ``path`` as a Megatron checkpoint (a marker file or ``iter_*`` directories), or None."""
    root = Path(path)
    if not root.is_dir() or (root / "config.json").is_file():
        return None
    for name in MEGATRON_MARKERS:
        if (root / name).exists():
            return f"it holds {name}"
    iters = sorted(p.name for p in root.glob("iter_*") if p.is_dir())
    return f"it holds {iters[0]}/" if iters else None


def refuse_megatron_reference(path: str) -> str | None:
    """The refusal of ``[ckpt] ref_load = path`` when it is a Megatron checkpoint, else None."""
    sign = megatron_checkpoint_sign(path)
    if sign is None:
        return None
    return f"{path} is a Megatron checkpoint ({sign}), not an HF directory; {REF_LOAD_FIX}"
