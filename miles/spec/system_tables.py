"""The run spec's system tables: where and how fast the run executes.

``[perf]`` (parallelism, precision, kernels), ``[sglang]``, ``[cluster]`` and ``[slurm]``. The conventions every
table follows are in ``miles.spec.tables``. Importable without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from miles.spec.table import TABLE_ARGS


@dataclass(**TABLE_ARGS)
class PerfConfig:
    """[perf]: training backend, parallelism, recomputation and offload."""

    backend: Literal["megatron", "fsdp"] = "megatron"
    """Training backend (Miles ``--train-backend``): Megatron-core (TP/PP/CP/EP) or FSDP2 (data parallel only)."""

    tp: int = field(default=1, metadata={"gt": 0})
    """Tensor-parallel size (Megatron ``--tensor-model-parallel-size``)."""

    pp: int = field(default=1, metadata={"gt": 0})
    """Pipeline-parallel size (Megatron ``--pipeline-model-parallel-size``)."""

    cp: int = field(default=1, metadata={"gt": 0})
    """Context-parallel size (Megatron ``--context-parallel-size``): each sequence split over ``cp`` ranks in ``2 *
    cp`` load-balanced chunks. Without Transformer Engine it needs ``attention_backend = "sdpa"`` (miles'
    context-parallel attention).
    """

    ep: int = field(default=1, metadata={"gt": 0})
    """Expert-parallel size (Megatron ``--expert-model-parallel-size``); must divide the expert count."""

    etp: int | None = field(default=None, metadata={"gt": 0})
    """Expert tensor-parallel size (Megatron ``--expert-tensor-parallel-size``); unset means ``tp``."""

    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs ``tp`` > 1): between the tensor-parallel matmuls (norms, residual
    stream) each rank holds ``1/tp`` of the tokens, which saves activation memory. Without Transformer Engine it
    uses miles' RMSNorm (see ``fused_kernels``). Required for MoE models with ``tp`` > 1.
    """

    attention_backend: Literal["unfused", "sdpa", "flash", "fused", "local", "auto"] = "auto"
    """Megatron core attention (Miles ``--attention-backend``). Without Transformer Engine: ``sdpa``, ``flash``,
    ``fused`` and ``auto`` (the default, the fastest) run torch's ``scaled_dot_product_attention`` (flash / cuDNN /
    memory-efficient kernels; numerically equal to the unfused path, faster at every length measured), which is also
    miles' context-parallel attention (``cp`` > 1 needs one of these); ``unfused``/``local`` run Megatron's unfused
    kernels (slower; for comparison). With Transformer Engine, Miles' names (``flash``, ``fused``, ``local``,
    ``auto``) are Megatron's own ``--attention-backend``; ``unfused`` and ``sdpa`` leave it to Megatron (``auto``).
    Ignored by FSDP (HF's SDPA attention).
    """

    fused_kernels: bool = True
    """Megatron backend: miles' replacements for what runs unfused without Transformer Engine: RMSNorm by torch's
    fused kernel with weights in the model dtype (as HF stores them; fp32 master copies in the optimizer), and the
    log-probs/entropy over the vocabulary in chunks with a hand-written backward instead of fp32 ``[tokens, vocab]``
    temporaries. On GPUs also torch's fused AdamW kernel instead of its ``foreach`` default, Megatron's SwiGLU with
    its hand-written backward and its RoPE, both compiled by ``torch.compile`` (the first step pays the compilation).
    Same math; faster and leaner in bf16, hence on by default; ``false`` runs Megatron's own unfused modules (for
    comparison). The norms are left to Transformer Engine when it is installed; ignored by FSDP.
    """

    recompute_granularity: Literal["full", "selective"] | None = None
    """Activation recomputation (Megatron ``--recompute-granularity``)."""

    recompute_method: Literal["uniform", "block"] | None = None
    """How layers are chosen for full recomputation (Megatron ``--recompute-method``)."""

    recompute_num_layers: int | None = field(default=None, metadata={"gt": 0})
    """Layers per recomputation unit (Megatron ``--recompute-num-layers``)."""

    moe_aux_loss_coeff: float = field(default=0.0, metadata={"ge": 0.0})
    """Weight of the MoE load-balancing loss (Megatron ``--moe-aux-loss-coeff``); 0 trains without it."""

    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"] = "none"
    """MoE load balancing (Megatron ``--moe-router-load-balancing-type``); the aux-loss kinds add a loss only with
    ``moe_aux_loss_coeff`` > 0.
    """

    moe_router_dtype: Literal["fp32", "fp64"] | None = None
    """Dtype of the MoE router's logits and softmax (Megatron ``--moe-router-dtype``); unset means the model dtype."""

    moe_token_dispatcher_type: Literal["alltoall", "allgather", "flex"] = "alltoall"
    """How tokens reach their experts (Megatron ``--moe-token-dispatcher-type``). Only ``alltoall`` runs:
    ``allgather`` refuses variable sequence lengths, which RL batches always have, and ``flex`` needs DeepEP.
    """

    moe_permute_fusion: bool = False
    """Fuse the MoE token permutation (Megatron ``--moe-permute-fusion``); needs Transformer Engine on the trainer
    nodes.
    """

    offload_train: bool | None = None
    """Move the actor's weights and optimizer off the GPU while engines generate (Miles ``--offload-train``); unset
    means on when colocated.
    """

    offload_rollout: bool | None = None
    """Release the engines' memory while the actor trains (Miles ``--offload-rollout``); unset means on when
    colocated.
    """


@dataclass(**TABLE_ARGS)
class SglangConfig:
    """[sglang]: the SGLang engines. Keys not listed here are passed to ``sglang.launch_server`` as flags, checked
    against
    the pinned SGLang release's own flag list.
    """

    rollout_num_gpus_per_engine: int = field(default=1, metadata={"gt": 0})
    """GPUs per engine, SGLang's tensor-parallel size (Miles ``--rollout-num-gpus-per-engine``)."""

    mem_fraction_static: float | None = field(default=None, metadata={"gt": 0.0, "le": 1.0})
    """Fraction of GPU memory SGLang reserves for weights and KV cache (``--mem-fraction-static``); unset means
    SGLang's default. Colocated runs need a lower value.
    """

    use_router: bool = False
    """Put sglang-router (0.3.2, installed beside SGLang) in front of the engines: the driver starts it at the
    plan's router port and sends it the rollouts, one request per sample; miles keeps its worker list to the engines
    holding the last pushed weights. ``false``: miles' client balances requests over the engines itself (least
    outstanding requests).
    """

    router_policy: Literal["manual", "cache_aware", "round_robin", "random"] = "manual"
    """How sglang-router picks an engine (its ``--policy``). ``manual``: every request names its conversation (a
    multi-turn sample; a single-turn prompt's n samples share one name) and all requests of one name go to one engine,
    whose prefix cache holds what they share; new names go to the engine with the fewest. ``cache_aware`` matches
    prefixes but moves requests off a busier engine. Used with ``use_router = true``.
    """

    server_args: dict[str, object] = field(default_factory=dict)
    """Every other ``[sglang]`` key, passed through as ``--key-with-dashes value`` (filled by the loader; not a TOML
    key).
    """


@dataclass(**TABLE_ARGS)
class ClusterConfig:
    """[cluster]: how the run is laid out on nodes and GPUs."""

    mode: Literal["colocate", "split"] = "colocate"
    """``colocate``: one Slurm job, every GPU runs a trainer rank and an engine shard. ``split``: engines and
    trainers on GPUs of their own: one job when both fit one node (disjoint ``CUDA_VISIBLE_DEVICES``), else a
    heterogeneous job, component 0 engines and component 1 trainers (Miles ``--colocate`` or not). Left out, it is
    chosen as Miles does and the plan says so: ``split`` when ``rollout_num_gpus`` or ``rollout_num_nodes`` names
    the engines' own GPUs (Miles without ``--colocate``), else ``colocate``.
    """

    gpus_per_node: int = field(default=8, metadata={"ge": 0})
    """GPUs on each node (Miles ``--num-gpus-per-node``); 0 means CPU-only nodes, where each trainer rank is a
    process.
    """

    actor_num_nodes: int = field(default=1, metadata={"gt": 0})
    """Nodes of the trainers (Miles ``--actor-num-nodes``)."""

    actor_num_gpus_per_node: int = field(default=8, metadata={"gt": 0})
    """Trainer ranks (GPUs, or processes on CPU-only nodes) per trainer node (Miles ``--actor-num-gpus-per-node``)."""

    rollout_num_nodes: int | None = field(default=None, metadata={"gt": 0})
    """Nodes of the engines in split mode; unset means derived from ``rollout_num_gpus``."""

    rollout_num_gpus: int | None = field(default=None, metadata={"gt": 0})
    """GPUs of all engines together (Miles ``--rollout-num-gpus``); in colocate mode it equals the trainer GPUs."""

    cpus_per_node: int = field(default=0, metadata={"ge": 0})
    """CPUs requested on each node; 0 leaves it to the site (all CPUs with ``exclusive``)."""

    mem_per_node: str = "0"
    """Memory requested on each node in Slurm's syntax (``0`` means all of it, ``512G``)."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where ranks compute: ``auto`` uses CUDA when torch sees a GPU, else the CPU with gloo."""


@dataclass(**TABLE_ARGS)
class SlurmConfig:
    """[slurm]: the Slurm job: where it runs, its limits, containers and site set-up."""

    partition: str = ""
    """Partition (``--partition``); empty means the site default."""

    rollout_partition: str = ""
    """Partition of the engine component in split mode; empty means ``partition``."""

    account: str = ""
    """Account to charge (``--account``)."""

    qos: str = ""
    """Quality of service (``--qos``)."""

    time: str = "04:00:00"
    """Time limit in Slurm's syntax (``--time``), e.g. ``1-00:00:00``; ``UNLIMITED`` asks for none where the
    partition allows it (then no save signal comes before a limit; preemption's TERM still saves).
    """

    constraint: str = ""
    """Node feature constraint (``--constraint``)."""

    reservation: str = ""
    """Reservation to run in (``--reservation``)."""

    exclusive: bool = True
    """Ask for whole nodes (``--exclusive``)."""

    gpu_request: Literal["gpus-per-node", "gres"] = "gpus-per-node"
    """How GPUs are requested: ``--gpus-per-node=N`` or ``--gres=gpu:N`` (older sites)."""

    container_runtime: Literal["", "pyxis", "apptainer"] = ""
    """Run ranks in a container: pyxis/enroot (``srun --container-image``) or Apptainer (``apptainer exec --nv``)."""

    container_image: str = ""
    """Container image (pyxis: URI or .sqsh; apptainer: .sif)."""

    container_mounts: list[str] = field(default_factory=list)
    """Bind mounts ``src:dst`` for the container; the run directory is always mounted."""

    modules: list[str] = field(default_factory=list)
    """Environment modules loaded at the top of the script (``module load ...``)."""

    setup: list[str] = field(default_factory=list)
    """Site preamble: shell lines run before anything else (activate an env, export NCCL settings)."""

    env: dict[str, str] = field(default_factory=dict)
    """Environment variables exported for every rank (e.g. ``NCCL_SOCKET_IFNAME``)."""

    signal_lead_time: int = field(default=120, metadata={"ge": 10})
    """Seconds before the time limit at which Slurm sends USR1 to the batch shell (``--signal=B:USR1@N``) so the run
    can save and requeue.
    """

    max_requeues: int = field(default=3, metadata={"ge": 0})
    """Stop requeuing after this many restarts (``SLURM_RESTART_COUNT``)."""

    python: str = "python3"
    """Python interpreter on the compute nodes that has miles installed."""
