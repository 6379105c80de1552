"""Where each of Miles' (and Megatron's) command-line flags lives in a miles run spec.

miles' keys are Miles' flags with underscores for dashes, in the table of the
flag's group. Three kinds of flag need more than that rule, and this module
is the one table of them, shared by the loader (its unknown-key messages) and
``miles convert`` (its flag table), so that both always say the same thing:

* :data:`ALIASES`: a flag whose miles key has another name, or lives in a
  table the flag's name does not suggest (Megatron's ``--tensor-model-parallel-size``
  is ``[perf] tp``). The loader suggests the key; the converter writes it.
* :data:`DISPOSITIONS`: a flag with no key, because miles always does what
  the flag asks (``always``), fixes the value (``fixed``), reads it from the
  HF ``config.json`` (``model``), or cannot do it (``unsupported``). The
  loader refuses such a key with this reason; the converter reports it, and
  fails when a flag that would change the experiment has no home
  (:attr:`Disposition.changes_experiment`).
* ``--sglang-*``: SGLang's own flags, written into ``[sglang]`` without the
  prefix and checked against the pinned SGLang release (:data:`SGLANG_PREFIX`).

Names are given as TOML keys (underscores); ``flag_key`` turns ``--a-b`` into ``a_b``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from miles.spec.fieldtypes import table_fields
from miles.spec.tables import TABLES

SGLANG_PREFIX = "sglang_"
"""Miles passes SGLang's flags as ``--sglang-<flag>``; miles takes them as ``[sglang] <flag>``."""

ALIASES: dict[str, str] = {
    # Megatron's parallelism flags: short keys in [perf].
    "tensor_model_parallel_size": "perf.tp",
    "pipeline_model_parallel_size": "perf.pp",
    "context_parallel_size": "perf.cp",
    "expert_model_parallel_size": "perf.ep",
    "expert_tensor_parallel_size": "perf.etp",
    "train_backend": "perf.backend",
    # Cluster shape.
    "num_gpus_per_node": "cluster.gpus_per_node",
    "colocate": "cluster.mode",
    # Model shape, which Megatron takes as flags and miles reads from config.json.
    "num_query_groups": "model.num_key_value_heads",
    "bf16": "model.dtype",
    "fp16": "model.dtype",
    "sglang_mem_fraction_static": "sglang.mem_fraction_static",
}
"""Flag (underscored) -> ``table.key`` of the miles key that does what the flag does."""


Kind = Literal["always", "fixed", "model", "unsupported"]


@dataclass(frozen=True)
class Disposition:
    """What miles does about a flag that has no key."""

    kind: Kind
    reason: str
    """One sentence: what miles does instead, and why."""
    changes_experiment: bool = False
    """Whether dropping the flag would train a different model (then ``miles convert`` exits 2)."""
    value: object = None
    """For ``fixed``: the value miles uses; a flag given another value changes the experiment."""

    def summary(self) -> str:
        head = {
            "always": "always on in miles",
            "fixed": "fixed in miles",
            "model": "read from config.json",
            "unsupported": "not supported",
        }[self.kind]
        return f"{head}: {self.reason}"


def _model(what: str) -> Disposition:
    return Disposition("model", f"as {what}, from [model] hf_checkpoint")


_DROPOUT = "0: the policy ratio compares log-probs of one deterministic network; a non-zero value has no home"

DISPOSITIONS: dict[str, Disposition] = {
    "attention_dropout": Disposition("fixed", _DROPOUT, value=0.0),
    "hidden_dropout": Disposition("fixed", _DROPOUT, value=0.0),
    "accumulate_allreduce_grads_in_fp32": Disposition(
        "always",
        "gradients are accumulated and reduced over data-parallel ranks in fp32 (Megatron DDP with "
        "grad_reduce_in_fp32; FSDP with an fp32 reduce dtype)",
    ),
    "attention_softmax_in_fp32": Disposition(
        "always", "the attention softmax runs in fp32 (Megatron's default; torch SDPA accumulates in fp32)"
    ),
    "use_distributed_optimizer": Disposition(
        "always", "the Megatron backend shards optimizer state over data-parallel ranks on GPUs"
    ),
    "no_gradient_accumulation_fusion": Disposition("fixed", "gradient-accumulation fusion is off (it needs apex)"),
    "no_bias_swiglu_fusion": Disposition("fixed", "the local Megatron path runs SwiGLU unfused"),
    "no_rope_fusion": Disposition("fixed", "the local Megatron path runs RoPE unfused"),
    "no_masked_softmax_fusion": Disposition("fixed", "the local Megatron path runs the masked softmax unfused"),
    "use_precision_aware_optimizer": Disposition(
        "unsupported",
        "miles keeps fp32 master weights and fp32 Adam moments (Megatron's behaviour without the "
        "flag); remove it: only memory differs",
    ),
    "optimizer_cpu_offload": Disposition(
        "unsupported",
        "optimizer state stays beside the weights it updates (Megatron's hybrid CPU optimizer is not wired into "
        "miles' checkpoints); colocated runs move weights, gradients and optimizer state to the host while the "
        "engines generate ([perf] offload_train): remove it, only memory differs",
    ),
    "overlap_cpu_optimizer_d2h_h2d": Disposition(
        "unsupported", "there is no overlapped CPU optimizer; remove it: it only changes speed"
    ),
    "moe_grouped_gemm": Disposition(
        "unsupported",
        "experts run as one MLP each (SequentialMLP), the layout miles' weight mapping and sync "
        "read; remove it: only speed differs",
    ),
    "log_probs_max_tokens_per_gpu": Disposition(
        "fixed", "log-probs are computed with the training micro-batches ([train] max_tokens_per_gpu)"
    ),
    "async_save": Disposition("fixed", "checkpoints are written synchronously, then committed atomically"),
    "megatron_to_hf_mode": Disposition("fixed", "miles' own name mapping converts weights for sync and export"),
    "use_miles_router": Disposition("unsupported", "use [sglang] use_router (sglang-router) or miles' client"),
    "wandb_key": Disposition("unsupported", "set WANDB_API_KEY in [slurm] env instead of a flag"),
    "wandb_host": Disposition("unsupported", "set WANDB_BASE_URL in [slurm] env instead of a flag"),
    "wandb_dir": Disposition("fixed", "W&B files go to <run_dir>/wandb"),
    "wandb_run_id": Disposition("fixed", "the W&B run id is kept in <run_dir>/wandb-run-id, one W&B run per run"),
    "wandb_random_suffix": Disposition("fixed", "the W&B group is [run] wandb_group as written, the name [run] name"),
    "tb_project_name": Disposition("fixed", "TensorBoard files go to <run_dir>/tb"),
    "seq_length": Disposition("fixed", "sequence lengths come from the rollout (variable-length batches)"),
    "hidden_size": _model("hidden_size"),
    "ffn_hidden_size": _model("intermediate_size"),
    "kv_channels": _model("head_dim"),
    "max_position_embeddings": _model("max_position_embeddings"),
    "vocab_size": _model("vocab_size"),
    "rotary_base": _model("rope_theta"),
    "norm_epsilon": _model("rms_norm_eps"),
    "normalization": _model("RMSNorm"),
    "swiglu": _model("SwiGLU"),
    "group_query_attention": _model("num_key_value_heads"),
    "use_rotary_position_embeddings": _model("RoPE"),
    "disable_bias_linear": _model("no linear biases"),
    "add_qkv_bias": _model("QKV bias"),
    "qk_layernorm": _model("per-head q/k norms"),
    "untie_embeddings_and_output_weights": _model("tie_word_embeddings"),
    "rotary_percent": _model("full RoPE"),
    "position_embedding_type": _model("RoPE"),
    "make_vocab_size_divisible_by": _model("vocabulary padding to a multiple of tp"),
    "moe_ffn_hidden_size": _model("moe_intermediate_size"),
    "moe_router_topk": _model("num_experts_per_tok"),
    "moe_router_score_function": _model("softmax router"),
    "moe_router_pre_softmax": _model("norm_topk_prob"),
    "moe_layer_freq": _model("every layer an MoE layer"),
    "rollout_health_check_interval": Disposition(
        "fixed", "miles' launcher supervises each engine process and restarts it when it exits"
    ),
    "rollout_health_check_timeout": Disposition(
        "fixed", "miles' launcher supervises each engine process and restarts it when it exits"
    ),
    "rollout_health_check_first_wait": Disposition(
        "fixed", "miles' launcher waits for each engine's /health_generate before the run starts"
    ),
    "sglang_router_ip": Disposition("fixed", "miles plans the router's address and port from the job"),
    "sglang_router_port": Disposition("fixed", "miles plans the router's address and port from the job"),
    "log_passrate": Disposition("fixed", "miles logs each rollout's mean reward (rollout/reward_mean)"),
    "use_fault_tolerance": Disposition(
        "always", "engines are supervised and restarted; trainer failures end the job, which Slurm requeues"
    ),
    "fully_async": Disposition(
        "unsupported",
        "miles does not support a persistent rollout worker with a bounded buffer yet; remove it, and set "
        "[run] train_async = true for one-step-off async training",
        changes_experiment=True,
    ),
    "max_weight_staleness": Disposition(
        "unsupported",
        "miles does not support fully_async yet, so there is no staleness bound to set; remove it",
        changes_experiment=True,
    ),
}
"""Flag (underscored) -> what miles does instead of having a key for it."""


def key_tables() -> dict[str, list[str]]:
    """Every spec key -> the tables that have it (a key name is meant to be unique across tables; a list keeps a
    duplicate visible instead of hiding it)."""
    out: dict[str, list[str]] = {}
    for table, cls in TABLES.items():
        for key in table_fields(cls):
            if (table, key) != ("sglang", "server_args"):
                out.setdefault(key, []).append(table)
    return out


def flag_key(flag: str) -> str:
    """``--rollout-batch-size`` -> ``rollout_batch_size``."""
    return flag.lstrip("-").replace("-", "_")


def unknown_key_hint(table: str, key: str) -> str | None:
    """What to say about an unknown ``[table] key`` that is a Miles or Megatron flag's name; None when it is not one."""
    name = key.replace("-", "_")
    if name in ALIASES:
        target = ALIASES[name]
        if name == "colocate":
            return 'Miles\' --colocate is [cluster] mode = "colocate" (without it Miles runs mode = "split")'
        if name in ("bf16", "fp16"):
            return f'Miles\' --{name} is {_where(target, table)} = "{"bfloat16" if name == "bf16" else "float16"}"'
        return f"Miles' --{name.replace('_', '-')} is {_where(target, table)}"
    if name in DISPOSITIONS:
        return f"Miles' --{name.replace('_', '-')} has no key: {DISPOSITIONS[name].summary()}"
    if name.startswith(SGLANG_PREFIX) and table == "sglang":
        return f"write SGLang's flag without the prefix: {name[len(SGLANG_PREFIX) :]}"
    return None


def _where(target: str, table: str) -> str:
    t, k = target.split(".")
    return f"{k}" if t == table else f"[{t}] {k}"
