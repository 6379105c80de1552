"""The model's shape (layers, heads, experts) as far as the planner can know it.

The planner checks parallel sizes against the model (heads divisible by TP,
experts by EP, layers by PP). It reads ``config.json`` when
``[model] hf_checkpoint`` is a readable directory on this machine; checkpoints
that live only on the cluster are described by the ``[model] num_*`` keys.
Explicit ``[model]`` keys win over config.json, so a user can always correct it.
Unknown fields make the corresponding rule "unchecked" (said in the summary),
never a silent pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miles.spec.tables import ModelConfig

# config.json spellings of each field across the HF architectures miles targets
# (Qwen2/3, Llama, Mixtral, DeepSeek, GLM).
_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "num_key_value_heads": ("num_key_value_heads", "multi_query_group_num"),
    "num_experts": ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"),
}


@dataclass(frozen=True, slots=True)
class ModelShape:
    """Shape fields the planner checks; ``None`` means unknown at plan time."""

    num_layers: int | None
    num_attention_heads: int | None
    num_key_value_heads: int | None
    num_experts: int | None
    source: str
    """Where the numbers came from, for messages (``config.json at ...`` or ``[model]``)."""


def _read_config(hf_checkpoint: str) -> tuple[dict[str, Any], Path] | None:
    if not hf_checkpoint:
        return None
    path = Path(hf_checkpoint) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return (raw, path) if isinstance(raw, dict) else None


def _from_config_json(hf_checkpoint: str) -> tuple[dict[str, int], str]:
    read = _read_config(hf_checkpoint)
    if read is None:
        return {}, ""
    raw, path = read
    # Multimodal configs nest the language model's fields.
    for nested in ("text_config", "language_config"):
        if isinstance(raw.get(nested), dict):
            raw = {**raw[nested], **{k: v for k, v in raw.items() if k not in raw[nested]}}
    found: dict[str, int] = {}
    for field_name, keys in _CONFIG_KEYS.items():
        for key in keys:
            value = raw.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                found[field_name] = value
                break
    if "num_attention_heads" in found and "num_key_value_heads" not in found:
        found["num_key_value_heads"] = found["num_attention_heads"]  # MHA: HF omits the key
    found.setdefault("num_experts", 0)  # a readable config that names no experts is a dense model
    return found, f"config.json at {path}"


def model_shape(model: ModelConfig) -> ModelShape:
    """Merge ``[model]`` keys over the readable config.json (if any)."""
    found, where = _from_config_json(model.hf_checkpoint)
    values: dict[str, int | None] = {}
    explicit = False
    for field_name in _CONFIG_KEYS:
        mine = getattr(model, field_name)
        if mine is not None:
            explicit = True
        values[field_name] = mine if mine is not None else found.get(field_name)
    sources = [s for s in (where, "[model]" if explicit else "") if s]
    return ModelShape(
        num_layers=values["num_layers"],
        num_attention_heads=values["num_attention_heads"],
        num_key_value_heads=values["num_key_value_heads"],
        num_experts=values["num_experts"],
        source=" + ".join(sources) or "unknown",
    )
