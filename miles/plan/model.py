"""The Plan: where every process of a run lives, as frozen data.

A Plan is the single answer to "what will this job look like on the cluster?".
``miles plan`` prints it, ``miles submit`` writes it into the run directory as
``plan.json`` and renders the sbatch script from it, and every rank reads it
back at start to learn its role, node, GPU and mesh coordinates. Keeping it
plain data (no methods that touch the system) is what lets the planner be a
pure, fast function that runs on a login node without torch.

Conventions:

* node indices are *within their Slurm component* (het group), so they match
  ``SLURM_NODEID`` inside ``srun --het-group=N``;
* GPU ids are indices on their node (what ``CUDA_VISIBLE_DEVICES`` would list);
  on CPU-only nodes (``gpus_per_node = 0``) they are *slots*: one slot per
  trainer process and one per engine process;
* trainer ranks follow Megatron's default order ``tp-cp-ep-dp-pp``: TP varies
  fastest, then CP, then DP, and PP slowest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["engines", "trainers", "colocated", "engines+trainers"]

_KW = {"frozen": True, "slots": True}


@dataclass(**_KW)
class Component:
    """One Slurm (het) component: a block of identical nodes."""

    het_group: int
    """Index of the het component (``--het-group``); 0 in colocate mode, where there is a single one."""
    role: Role
    """What runs on it: ``engines`` and ``trainers`` in split mode, ``colocated`` (both) in colocate mode, and
    ``engines+trainers`` in split mode on one node (disjoint GPUs: the engines' first, then the trainers')."""
    nodes: int
    """Nodes of this component (``--nodes``)."""
    gpus_per_node: int
    """GPUs requested on each node (``--gpus-per-node`` / ``--gres=gpu:N``); 0 on CPU-only nodes."""
    tasks_per_node: int
    """Tasks allocated per node (``--ntasks-per-node``): one per trainer rank, or one per engine."""
    cpus_per_task: int
    """CPUs per task (``--cpus-per-task``); 0 leaves it to the site."""
    mem: str
    """Memory per node in Slurm's syntax (``--mem``); ``0`` means all of it."""
    partition: str
    """Partition of this component; empty means the site default."""


@dataclass(**_KW)
class TrainerMesh:
    """The trainers' parallel layout (Megatron semantics; FSDP is pure DP)."""

    backend: str
    tp: int
    pp: int
    cp: int
    dp: int
    """Derived: trainer ranks / (TP x PP x CP)."""
    ep: int
    etp: int
    """Expert tensor parallel size (``perf.etp``, or TP when unset)."""
    expert_dp: int
    """Derived: ranks / (ETP x EP x PP), Megatron's expert data-parallel size."""
    world_size: int


@dataclass(**_KW)
class TrainerRank:
    """Where one trainer rank runs and its coordinates in the mesh."""

    rank: int
    node: int
    local_rank: int
    gpu: int
    """GPU id on the node; the process slot on CPU-only nodes."""
    tp: int
    pp: int
    cp: int
    dp: int


@dataclass(**_KW)
class Engine:
    """One inference engine (an SGLang server or the embedded engine)."""

    index: int
    tp: int
    """GPUs of this engine (SGLang's tensor-parallel size); 1 slot on CPU-only nodes."""
    het_group: int
    node: int
    """Node index within the engine's component."""
    local_index: int
    """Index of this engine among the engines on its node; selects its ports."""
    gpus: tuple[int, ...]
    """GPU ids on the node (slots on CPU-only nodes)."""
    ranks: tuple[int, ...]
    """Ranks of this engine's GPUs in each weight-update group (the same in every group)."""


@dataclass(**_KW)
class Ports:
    """TCP ports of a job, all derived from its job id (see :mod:`miles.plan.ports`)."""

    job_id: int | None
    """Job id the ports were derived for; ``None`` means placeholder ports of job id 0."""
    base: int
    master: int
    """Trainers' torch.distributed ``MASTER_PORT``."""
    router: int
    """sglang-router (when used)."""
    weight_update: tuple[int, ...]
    """Rendezvous port of each weight-update group (one per PP stage)."""
    engine_http: tuple[int, ...]
    """HTTP port of each engine (engines on different nodes may share a number)."""
    engine_nccl: tuple[int, ...]
    """Internal NCCL port of each engine (SGLang ``--nccl-port``)."""


@dataclass(**_KW)
class WeightUpdateGroup:
    """A process group that broadcasts trainer weights to every engine.

    There is one per pipeline stage: the stage's first rank (dp = tp = cp = 0)
    owns that stage's layers and is group rank 0; engine GPUs follow.
    """

    pp_stage: int
    source_rank: int
    """Global trainer rank that broadcasts (group rank 0)."""
    port: int
    world_size: int
    """1 + every engine GPU (slot)."""
    engine_rank_offsets: tuple[int, ...]
    """Group rank of each engine's first GPU; engine i owns ``offset .. offset + tp - 1``."""


@dataclass(**_KW)
class Plan:
    """Everything the planner decided for one run."""

    name: str
    run_dir: str
    mode: Literal["colocate", "split"]
    device: Literal["gpu", "cpu"]
    """``cpu`` when ``cluster.gpus_per_node = 0``: ranks are processes and GPU ids are slots."""
    components: tuple[Component, ...]
    mesh: TrainerMesh
    trainer_het_group: int
    engine_het_group: int
    trainer_ranks: tuple[TrainerRank, ...]
    engines: tuple[Engine, ...]
    engine_tp: int
    engines_per_node: int
    ports: Ports
    weight_update_groups: tuple[WeightUpdateGroup, ...]
    warnings: tuple[str, ...]
    """Things that work but deserve a look (uneven PP layers, het-job scheduling caveats)."""
    unchecked: tuple[str, ...]
    """Rules that could not be checked (e.g. model shape unknown at plan time)."""

    @property
    def trainer_gpus(self) -> int:
        return self.mesh.world_size

    @property
    def rollout_gpus(self) -> int:
        return sum(e.tp for e in self.engines)
