"""Model shapes for the benchmarks: HF configs, presets, parameter counts and FLOPs.

A benchmark must move and compute on the tensors a real model has (names,
shapes, dtypes), but it needs no model hub and no trained weights. So a model is
a transformers config: read from a ``config.json`` (``--config``) or one of the
presets below, whose shapes are copied from the public ``config.json`` of each
model. ``--total-gb`` repeats decoder layers until the weights reach a size, so
one architecture covers the 1-16 GiB range of the sync benchmark.

Names and shapes come from the model built on the ``meta`` device: no memory is
allocated, and the names are exactly those the actor sends and the engine loads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miles.errors import UserError

PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
    "qwen2.5-1.5b": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
    "qwen2.5-3b": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 131072,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
    "llama3.2-1b": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
    "smollm2-135m": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
    "qwen3-8b": {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
    "llama3-8b": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
}
"""Architecture fields of public checkpoints (Qwen/Qwen2.5-0.5B, Qwen/Qwen2.5-1.5B, Qwen/Qwen2.5-3B, Qwen/Qwen2.5-7B,
meta-llama/Llama-3.2-1B, Qwen/Qwen3-8B, meta-llama/Meta-Llama-3-8B ``config.json``); nothing else of those models
is used.
"""

GIB = 1 << 30


def load_config_dict(config: str | None, preset: str | None) -> dict[str, Any]:
    """The config dict of ``--config PATH`` (a config.json or a directory holding one) or ``--preset NAME``."""
    if config and preset:
        raise UserError("give either --config or --preset, not both")
    if preset:
        if preset not in PRESETS:
            raise UserError(f"--preset {preset!r} is not known; choose one of {sorted(PRESETS)} or pass --config")
        return dict(PRESETS[preset])
    if not config:
        raise UserError("give the model shape: --config path/to/config.json or --preset " + "|".join(sorted(PRESETS)))
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"--config {config}: cannot read {path}: {e.strerror}") from e
    except ValueError as e:
        raise UserError(f"--config {config}: {path} is not JSON: {e}") from e
    if not isinstance(data, dict) or "model_type" not in data:
        raise UserError(f"--config {config}: {path} has no 'model_type'; is it an HF config.json?")
    return data


def hf_config(data: dict[str, Any]) -> Any:
    """A transformers ``PretrainedConfig`` from a config dict."""
    from transformers import AutoConfig

    fields = {k: v for k, v in data.items() if k not in ("model_type", "transformers_version")}
    try:
        return AutoConfig.for_model(data["model_type"], **fields)
    except (KeyError, ValueError) as e:
        raise UserError(f"transformers does not know model_type {data['model_type']!r}: {e}") from e


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def tensor_specs(data: dict[str, Any]) -> list[TensorSpec]:
    """Names and shapes the actor sends (``named_hf_weights``: parameters, tied ones once, then persistent buffers)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(data))
    out = [TensorSpec(n, tuple(p.shape)) for n, p in model.named_parameters()]
    for mod_name, mod in model.named_modules():
        for b_name, b in mod.named_buffers(recurse=False):
            if b is None or b_name in getattr(mod, "_non_persistent_buffers_set", set()):
                continue
            out.append(TensorSpec(f"{mod_name}.{b_name}" if mod_name else b_name, tuple(b.shape)))
    return out


def param_count(data: dict[str, Any]) -> int:
    return sum(t.numel for t in tensor_specs(data))


def with_layers(data: dict[str, Any], layers: int) -> dict[str, Any]:
    """``data`` with ``layers`` decoder layers; a per-layer list (``layer_types``) is repeated to the new length."""
    out = {**data, "num_hidden_layers": int(layers)}
    types = data.get("layer_types")
    if isinstance(types, list) and types:
        out["layer_types"] = [types[i % len(types)] for i in range(int(layers))]
    return out


def scale_layers(data: dict[str, Any], total_bytes: int, element_size: int) -> dict[str, Any]:
    """``data`` with ``num_hidden_layers`` set so the weights are as close as possible to ``total_bytes``.

    Layers are identical, so the size is affine in the layer count: two meta
    builds (1 and 2 layers) give the fixed part (embeddings, head, norms) and the
    per-layer part.
    """
    one = param_count(with_layers(data, 1)) * element_size
    two = param_count(with_layers(data, 2)) * element_size
    per_layer, fixed = two - one, one - (two - one)
    layers = max(1, round((total_bytes - fixed) / per_layer))
    return with_layers(data, layers)


def head_dim(data: dict[str, Any]) -> int:
    return int(data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"])


def train_flops_per_token(data: dict[str, Any], seq_len: int) -> float:
    """Model FLOPs of one trained token (forward + backward), the PaLM/Megatron MFU convention.

    ``6 * N`` for the matmul weights (every parameter but the input embedding
    lookup; the LM head counts even when tied) plus ``12 * L * heads * head_dim *
    seq_len`` for the attention scores and weighted sum (non-causal count, as in
    PaLM's appendix B). Recomputation is not counted: MFU, not HFU.
    """
    specs = tensor_specs(data)
    n = sum(t.numel for t in specs if "embed_tokens" not in t.name)
    if data.get("tie_word_embeddings"):
        n += int(data["vocab_size"]) * int(data["hidden_size"])
    attn = 12 * int(data["num_hidden_layers"]) * int(data["num_attention_heads"]) * head_dim(data) * seq_len
    return float(6 * n + attn)
