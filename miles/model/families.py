"""The HF model families each training backend can build, by ``config.json`` ``model_type``.

Torch-free, so that ``miles validate`` can refuse a model the chosen backend
cannot train before anything is submitted, with the same list the backend
itself checks at start (:func:`miles.train.megatron.config.arch_from_dict`).
FSDP trains whatever ``transformers`` builds, so only Megatron has a list.
"""

from __future__ import annotations

MEGATRON_FAMILIES: tuple[str, ...] = ("qwen2", "qwen3", "llama", "qwen3_moe")
"""``model_type`` values with a Megatron mapping (architecture and weight names)."""

MEGATRON_ARCHITECTURES: dict[str, str] = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
"""The HF class of each mapped family, for messages."""


def megatron_families_text() -> str:
    """``qwen2 (Qwen2ForCausalLM), ...`` for messages."""
    return ", ".join(f"{f} ({MEGATRON_ARCHITECTURES[f]})" for f in MEGATRON_FAMILIES)
