"""HF ``config.json`` -> Megatron ``TransformerConfig``: the one place where the two vocabularies meet.

The HF directory is the source of truth for the architecture (the engines load
the same directory), so the Megatron model is derived from it rather than
configured twice. ``config.json`` is read as plain JSON instead of through
transformers' config classes: their attribute names moved between
transformers 4 and 5 (``rope_scaling`` became ``rope_parameters``) and the file
format is what both versions write.

Supported families, each checked against the HF model in tests:

* ``qwen2`` (Qwen2, Qwen2.5): QKV bias;
* ``qwen3``: per-head RMSNorm on queries and keys (``qk_layernorm``);
* ``llama`` (Llama 3, 3.1, 3.2): optional ``llama3`` RoPE scaling;
* ``qwen3_moe``: routed experts (softmax top-k router), trained with expert parallelism.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from miles.errors import UserError
from miles.model.architectures import MEGATRON_FAMILIES
from miles.spec.tables import OptimizerConfig, PerfConfig
from miles.train.megatron.norm import RMSNorm

if TYPE_CHECKING:
    from miles.plan.model import TrainerMesh

Family = Literal["qwen2", "qwen3", "llama", "qwen3_moe"]
FAMILIES: tuple[str, ...] = MEGATRON_FAMILIES
"""Kept in :mod:`miles.model.architectures`, where ``miles validate`` reads it without importing torch."""


@dataclass(frozen=True)
class HFArch:
    """The architecture facts of an HF causal LM that the Megatron model and the weight mapping need."""

    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope_scaling: dict[str, Any] | None = None
    """``llama3`` RoPE scaling parameters (factor, low/high_freq_factor, original_max_position_embeddings)."""
    num_experts: int = 0
    moe_topk: int = 0
    moe_ffn_hidden_size: int = 0
    norm_topk_prob: bool = True


def read_hf_arch(model_dir: str) -> HFArch:
    """Parse ``<model_dir>/config.json`` into an :class:`HFArch`, refusing what the Megatron backend cannot train."""
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: not found; [model] hf_checkpoint must be an HF model directory") from None
    return arch_from_dict(cfg, source=path)


def arch_from_dict(cfg: dict[str, Any], source: str = "config.json") -> HFArch:
    """Build an :class:`HFArch` from the dict of an HF ``config.json``."""
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise UserError(
            f"{source}: model_type {family!r} has no Megatron mapping; supported: {', '.join(FAMILIES)} "
            '(or use [perf] backend = "fsdp", which trains any HF causal LM)'
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{source}: hidden_act {act!r} is not supported by the Megatron mapping (only silu / SwiGLU)")
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling: dict[str, Any] | None = None
    if rope_type == "llama3":
        scaling = {
            "factor": float(rope["factor"]),
            "low_freq_factor": float(rope.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(rope.get("high_freq_factor", 4.0)),
            "original_max_position_embeddings": int(rope.get("original_max_position_embeddings", 8192)),
        }
    elif rope_type not in ("default", None):
        raise UserError(f"{source}: RoPE type {rope_type!r} is not supported by the Megatron backend (default, llama3)")
    if cfg.get("use_sliding_window"):
        raise UserError(f"{source}: sliding-window attention is not supported by the Megatron backend")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0) if family == "qwen3_moe" else 0
    if family == "qwen3_moe":
        step = int(cfg.get("decoder_sparse_step", 1))
        if step != 1 or cfg.get("mlp_only_layers"):
            raise UserError(
                f"{source}: Qwen3-MoE with dense layers (decoder_sparse_step/mlp_only_layers) is not mapped"
            )
    qkv_bias = True if family == "qwen2" else bool(cfg.get("attention_bias", False))
    if cfg.get("mlp_bias"):
        raise UserError(f"{source}: mlp_bias = true is not supported by the Megatron mapping")
    return HFArch(
        family=family,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        ffn_hidden_size=int(cfg.get("intermediate_size", 0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=family in ("qwen3", "qwen3_moe"),
        rope_scaling=scaling,
        num_experts=num_experts,
        moe_topk=int(cfg.get("num_experts_per_tok") or 0),
        moe_ffn_hidden_size=int(cfg.get("moe_intermediate_size") or 0),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
    )


def padded_vocab_size(arch: HFArch, tp: int) -> int:
    """Vocabulary rows of the Megatron embedding: a multiple of ``tp`` so every rank holds an equal slice.

    Padding rows are zero and never exported; their logits are masked to -inf
    in the log-probs (:mod:`miles.train.megatron.logprobs`), so they change nothing.
    """
    return int(math.ceil(arch.vocab_size / tp) * tp)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_runtime(perf: PerfConfig, use_te: bool) -> None:
    """Refuse what the trainer node's software cannot run (the layout itself was checked by the planner)."""
    if perf.moe_permute_fusion and not use_te:
        raise UserError(
            "[perf] moe_permute_fusion = true needs Transformer Engine, which does not import here: "
            "install it on the trainer nodes, or set moe_permute_fusion = false"
        )


def _known_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def transformer_config(
    arch: HFArch,
    mesh: TrainerMesh,
    perf: PerfConfig,
    *,
    dtype: torch.dtype,
    use_te: bool,
    on_cuda: bool = False,
) -> Any:
    """Translate HF architecture + the planner's mesh + [perf] into a Megatron ``TransformerConfig``.

    The parallel sizes are the mesh's (the layout ``miles plan`` checked); ``perf``
    gives the rest: sequence parallelism, recomputation and the MoE router.

    Every fused kernel that needs apex or TE is switched off on the local
    (non-TE) path; the local ones are what matches the HF model bit-for-bit in
    fp32. One fusion needs neither: Megatron's SwiGLU (forward and a
    hand-written backward, compiled by ``torch.compile``), used on GPUs with
    ``[perf] fused_kernels`` (one pass over the ``[tokens, 2 ffn]`` activations
    each way instead of the chunk, SiLU and product kernels and their autograd).
    Dropout is 0: RL fine-tuning computes the ratio against log-probs of the same deterministic network. The MoE
    router's balancing, aux loss, dtype, dispatcher and permute fusion are
    the ``[perf] moe_*`` keys, passed to megatron-core as they are.
    """
    from megatron.core.transformer import TransformerConfig

    kwargs: dict[str, Any] = {
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "num_attention_heads": arch.num_heads,
        "num_query_groups": arch.num_kv_heads,
        "kv_channels": arch.head_dim,
        "ffn_hidden_size": arch.ffn_hidden_size or arch.moe_ffn_hidden_size,
        "normalization": "RMSNorm",
        "layernorm_epsilon": arch.rms_norm_eps,
        "gated_linear_unit": True,
        "activation_func": torch.nn.functional.silu,
        "add_bias_linear": False,
        "add_qkv_bias": arch.qkv_bias,
        "qk_layernorm": arch.qk_norm,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "bias_activation_fusion": on_cuda and perf.fused_kernels and not use_te,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
        "tensor_model_parallel_size": mesh.tp,
        "pipeline_model_parallel_size": mesh.pp,
        "context_parallel_size": mesh.cp,
        "expert_model_parallel_size": mesh.ep,
        "expert_tensor_parallel_size": mesh.etp,
        "sequence_parallel": perf.sequence_parallel,
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "use_cpu_initialization": True,
        "perform_initialization": False,
        "variable_seq_lengths": True,
        # allgather (the default dispatcher) refuses variable sequence lengths, even for dense models.
        "moe_token_dispatcher_type": "alltoall",
        # The actor normalises the loss itself (see actor.py); Megatron must not rescale it.
        "calculate_per_token_loss": True,
        "recompute_granularity": perf.recompute_granularity,
        "recompute_method": perf.recompute_method,
        "recompute_num_layers": perf.recompute_num_layers,
    }
    if perf.recompute_granularity == "full" and perf.recompute_method is None:
        kwargs["recompute_method"] = "uniform"
        kwargs["recompute_num_layers"] = perf.recompute_num_layers or 1
    if arch.num_experts:
        kwargs.update(
            num_moe_experts=arch.num_experts,
            moe_router_topk=arch.moe_topk,
            moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
            # HF Qwen3-MoE: softmax over all experts then top-k (pre-softmax), renormalised
            # over the top-k only with norm_topk_prob; Megatron's top-k-then-softmax is the
            # renormalised form.
            moe_router_pre_softmax=not arch.norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_load_balancing_type=perf.moe_router_load_balancing_type,
            moe_aux_loss_coeff=perf.moe_aux_loss_coeff,
            moe_token_dispatcher_type=perf.moe_token_dispatcher_type,
            moe_grouped_gemm=False,
            moe_permute_fusion=perf.moe_permute_fusion,
        )
        if perf.moe_router_dtype is not None:
            kwargs["moe_router_dtype"] = perf.moe_router_dtype
    known = _known_fields(TransformerConfig)
    dropped = {k for k in kwargs if k not in known}
    # Fields that only some releases have (0.16.1 vs 0.19.x) are set only where they exist, unless the spec asks for
    # what the field would do.
    asked = {"moe_router_dtype"} | ({"moe_permute_fusion"} if perf.moe_permute_fusion else set())
    if dropped & asked:
        raise UserError(
            f"[perf] {', '.join(sorted(dropped & asked))}: this megatron-core release has no such option; "
            "remove the key or install a newer megatron-core"
        )
    for k in dropped & {"moe_permute_fusion", "moe_router_score_function"}:
        kwargs.pop(k)
    backend = megatron_attention_backend(perf.attention_backend) if use_te else None
    if backend is not None and "attention_backend" in known:
        from megatron.core.transformer.enums import AttnBackend

        kwargs["attention_backend"] = AttnBackend[backend]
    if "transformer_impl" in known:
        kwargs["transformer_impl"] = "transformer_engine" if use_te else "local"
    return TransformerConfig(**kwargs)


LOCAL_ATTENTION = {
    "unfused": "unfused",
    "local": "unfused",
    "sdpa": "sdpa",
    "flash": "sdpa",
    "fused": "sdpa",
    "auto": "sdpa",
}
"""``[perf] attention_backend`` (Miles' names and miles' own) -> the core attention miles runs without Transformer
Engine: Megatron's unfused kernels, or torch SDPA (which dispatches to flash, cuDNN or memory-efficient kernels)."""


def megatron_attention_backend(name: str) -> str:
    """The Megatron ``AttnBackend`` member for ``name`` when Transformer Engine runs attention: Miles' names as they
    are; miles' own (``unfused``, the default, and ``sdpa``) leave the choice to Megatron (``auto``)."""
    return "auto" if name in ("unfused", "sdpa") else name


def layer_spec(arch: HFArch, use_te: bool, attention_backend: str = "unfused", fused_kernels: bool = False) -> Any:
    """The transformer-layer spec: Transformer Engine's fused modules when TE imports, else Megatron's local ones.

    On the local spec, ``attention_backend = "sdpa"`` swaps Megatron's unfused
    core attention for :class:`miles.train.megatron.attention.SdpaAttention`,
    and ``fused_kernels`` its float32-weight torch norms for
    :class:`miles.train.megatron.norm.RMSNorm` (torch's fused kernel; also the
    norm that sequence parallelism needs, see :func:`own_norms`).
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs

    num_experts = arch.num_experts or None
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_norm
        )
    spec = specs.get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_norm, normalization="RMSNorm"
    )
    attn = spec.submodules.self_attention
    if LOCAL_ATTENTION[attention_backend] == "sdpa":
        from miles.train.megatron.attention import SdpaAttention  # deferred: imports megatron-core, only when chosen

        attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, core_attention=SdpaAttention))
    layer = {"self_attention": attn}
    if fused_kernels:
        qk = {"q_layernorm": RMSNorm, "k_layernorm": RMSNorm} if arch.qk_norm else {}
        layer = {
            "self_attention": dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, **qk)),
            "input_layernorm": RMSNorm,
            "pre_mlp_layernorm": RMSNorm,
        }
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, **layer))


def packs_sequences(qkv_format: str, attention_backend: str, cp: int, use_te: bool) -> bool:
    """Whether micro-batches are packed (``[train] qkv_format = "thd"``) with this ``[perf] attention_backend`` and
    the mesh's context-parallel size ``cp``, or padded instead.

    Packed attention runs in Transformer Engine, or without it in
    :class:`miles.train.megatron.attention.SdpaAttention` (causal within each
    document, :mod:`miles.train.document_attention`); Megatron's unfused local attention has no packed path. Context
    parallelism pads too: miles' context-parallel attention splits one
    sequence into load-balanced chunks, which a pack of documents would need
    per document. Tensor, sequence, pipeline and expert parallelism all pack.
    """
    if qkv_format != "thd" or cp > 1:
        return False
    return use_te or LOCAL_ATTENTION[attention_backend] == "sdpa"


def own_norms(perf: PerfConfig, use_te: bool) -> bool:
    """Whether the local spec's norms are miles' RMSNorm: with ``fused_kernels``, and always under sequence
    parallelism (Megatron's torch norms refuse it; miles' is tagged so TP sums its weight gradients)."""
    return not use_te and (perf.fused_kernels or perf.sequence_parallel)


def te_available() -> bool:
    """Whether Transformer Engine's PyTorch modules import (never on CPU-only machines)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def megatron_optimizer_config(opt: OptimizerConfig, dtype: torch.dtype, distributed: bool) -> Any:
    """[optimizer] -> Megatron ``OptimizerConfig`` (GPU path: fp32 master weights, distributed optimizer)."""
    from megatron.core.optimizer import OptimizerConfig as MOptimizerConfig

    return MOptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=distributed,
    )
