"""Build Megatron's process groups and a ``GPTModel`` from an HF directory.

Why ``GPTModel`` and not ``HybridModel``: megatron-core 0.19 steers new
hybrid (Mamba/attention) architectures to ``HybridModel``, but that class is a
stack driven by a layer-pattern string, has no Llama-3 RoPE scaling, and does
not exist in 0.16.1 (the last release for Python 3.11, which CPU CI runs). The
families miles maps (Qwen2/2.5, Qwen3, Llama 3, Qwen3-MoE) are plain decoder
stacks that ``GPTModel`` builds in both releases with the same parameter
names, so one mapping table serves both.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from miles.plan.model import TrainerMesh
from miles.spec.tables import PerfConfig
from miles.train.megatron.config import HFArch, layer_spec, own_norms, padded_vocab_size, transformer_config
from miles.train.megatron.norm import RMSNorm
from miles.train.megatron.weights import mark_tensor_parallel


def init_parallel(mesh: TrainerMesh, seed: int) -> None:
    """Create Megatron's TP/PP/CP/EP/DP groups over the default process group and seed its RNG tracker.

    Megatron's ``parallel_state`` builds its groups over ranks ``0..world-1``
    of the default group, so every rank of the default group must be a trainer.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=mesh.tp,
        pipeline_model_parallel_size=mesh.pp,
        context_parallel_size=mesh.cp,
        expert_model_parallel_size=mesh.ep,
        expert_tensor_parallel_size=mesh.etp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.x RoPE frequency scaling with the checkpoint's own parameters.

    Megatron's ``rope_scaling`` hard-codes ``low_freq_factor=1``,
    ``high_freq_factor=4`` and an original context of 8192; computing the
    frequencies here from ``config.json`` keeps any Llama 3 variant exact.
    """
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def build_gpt_model(
    arch: HFArch, mesh: TrainerMesh, perf: PerfConfig, dtype: torch.dtype, use_te: bool, device: torch.device
) -> Any:
    """This rank's pipeline stage of the model on the planner's ``mesh``, on ``device``, weights uninitialised (load
    them next).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if arch.num_experts:
        _patch_router_gemm()
    _compile_rope(device.type == "cuda" and perf.fused_kernels and not use_te)
    config = transformer_config(arch, mesh, perf, dtype=dtype, use_te=use_te, on_cuda=device.type == "cuda")
    spec = layer_spec(arch, use_te, perf.attention_backend, own_norms(perf, use_te))
    if own_norms(perf, use_te):
        # The block builds its final norm from a module-level default (a torch norm, which refuses sequence
        # parallelism), not from the layer spec; a block spec names it.
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

        spec = TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=RMSNorm)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(arch, mesh.tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,  # type: ignore[arg-type]  # annotated int, used as a float base
    )
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is not None:
        dim = arch.head_dim
        base = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        if arch.rope_scaling is not None:
            base = llama3_inv_freq(base, arch.rope_scaling)
        rope.inv_freq = base.to(device)
    model.to(device)

    mark_tensor_parallel(model, arch)
    return model


def _patch_router_gemm() -> None:
    """megatron-core 0.16.1 without Transformer Engine leaves ``te_general_gemm`` undefined in
    ``moe_utils`` and its router then fails with a ``NameError``; 0.19 defines it as ``None``.
    Defining it as ``None`` selects the plain ``torch.mm`` router path, as 0.19 does."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


_ROPE: dict[bool, Any] = {}
"""Megatron's RoPE function as it ships (False) and compiled (True), once each per process."""


def _compile_rope(on: bool) -> None:
    """Run Megatron's unfused RoPE as one compiled kernel each way (``[perf] fused_kernels`` on GPUs, no TE).

    Megatron's fused RoPE needs Transformer Engine; its local path spends a dozen elementwise kernels per layer
    on q and k (cos, sin, casts, the half rotation, products, sum, concatenation) and as many in the backward.
    ``torch.compile`` of that same function (dynamic shapes: RL sequence lengths vary) fuses them. The choice
    replaces the module-level function megatron-core's ``apply_rotary_pos_emb`` calls, so it holds for every
    model of the process: the model built last decides (``miles bench train`` variants build one at a time).
    """
    from megatron.core.models.common.embeddings import rope_utils

    if not _ROPE:
        _ROPE[False] = rope_utils._apply_rotary_pos_emb_bshd
    if on and True not in _ROPE:
        _ROPE[True] = torch.compile(_ROPE[False], dynamic=True)
    rope_utils._apply_rotary_pos_emb_bshd = _ROPE[on]
