"""``make_plan``: spec -> Plan, a pure function.

It reads nothing but the spec (and, through :mod:`miles.plan.shape`, the
model's config.json when that is readable), writes nothing, runs nothing, so
``miles validate`` / ``miles plan`` answer instantly on a login node and tests
can plan 1024-node jobs on a laptop.

Layout decisions (the "why" of each):

* colocate: one component; trainer rank r sits on node r // G, GPU r % G
  (G = ``actor_num_gpus_per_node``); engines take consecutive GPU blocks of
  size engine-TP on the same nodes, so every GPU holds one trainer rank and one
  engine shard.
* split: component 0 holds the engines (so the batch shell, which Slurm runs on
  the first node of component 0, sits next to the cheap processes), component
  1 the trainers. Engines fill each node with consecutive GPU blocks.
* split on one node (engines and trainers fit one node together, e.g. 4 + 4 of
  8 GPUs, as Miles runs it): one plain job instead of a het job of two whole
  nodes; the engines take GPUs ``0..R-1``, the trainers ``R..R+T-1``, each
  step seeing only its own (``CUDA_VISIBLE_DEVICES``).
* CPU-only (``gpus_per_node = 0``): GPU ids become slots; each trainer rank
  and each engine is one process in one slot.
"""

from __future__ import annotations

import dataclasses

from miles.plan import ports as port_layout
from miles.plan.model import Component, Engine, Plan, Ports, TrainerMesh, TrainerRank, WeightUpdateGroup
from miles.plan.rules import Derived, derive, mesh_rules
from miles.plan.shape import model_shape
from miles.spec.tables import Spec


def run_dir_of(spec: Spec) -> str:
    """The run directory as the spec states it (``runs/<name>`` when unset); not resolved against any cwd."""
    return spec.run.run_dir or f"runs/{spec.run.name}"


def make_plan(spec: Spec, job_id: int | None = None) -> Plan:
    """Check every rule and lay the run out; raise :class:`~miles.plan.rules.PlanError` listing all problems."""
    d = derive(spec)
    c = spec.cluster
    mesh = _mesh(spec, d.dp, d.etp, d.trainer_gpus)
    components: tuple[Component, ...]
    if c.mode == "colocate":
        trainer_group = engine_group = 0
        components = (
            Component(
                het_group=0,
                role="colocated",
                nodes=d.trainer_nodes,
                gpus_per_node=d.trainer_gpus_per_node if d.device == "gpu" else 0,
                tasks_per_node=d.trainer_gpus_per_node,
                cpus_per_task=d.trainer_cpus_per_task,
                mem=c.mem_per_node,
                partition=spec.slurm.partition,
            ),
        )
    elif d.one_node:
        trainer_group = engine_group = 0
        components = (
            Component(
                het_group=0,
                role="engines+trainers",
                nodes=1,
                gpus_per_node=d.rollout_gpus + d.trainer_gpus,
                tasks_per_node=d.trainer_gpus_per_node + d.engines_per_node,
                cpus_per_task=d.trainer_cpus_per_task,
                mem=c.mem_per_node,
                partition=spec.slurm.partition,
            ),
        )
    else:
        engine_group, trainer_group = 0, 1
        components = (
            Component(
                het_group=0,
                role="engines",
                nodes=d.rollout_nodes,
                gpus_per_node=d.rollout_gpus_per_node if d.device == "gpu" else 0,
                tasks_per_node=d.engines_per_node,
                cpus_per_task=d.engine_cpus_per_task,
                mem=c.mem_per_node,
                partition=spec.slurm.rollout_partition or spec.slurm.partition,
            ),
            Component(
                het_group=1,
                role="trainers",
                nodes=d.trainer_nodes,
                gpus_per_node=d.trainer_gpus_per_node if d.device == "gpu" else 0,
                tasks_per_node=d.trainer_gpus_per_node,
                cpus_per_task=d.trainer_cpus_per_task,
                mem=c.mem_per_node,
                partition=spec.slurm.partition,
            ),
        )
    trainer_ranks = _trainer_ranks(mesh, d.trainer_gpus_per_node, first_gpu=d.rollout_gpus if d.one_node else 0)
    engines = _engines(d, engine_group)
    job_ports = _ports(job_id, mesh.pp, engines, d.engines_per_node)
    groups = _weight_update_groups(mesh, engines, job_ports)
    return Plan(
        name=spec.run.name,
        run_dir=run_dir_of(spec),
        mode=c.mode,
        device="gpu" if d.device == "gpu" else "cpu",
        components=components,
        mesh=mesh,
        trainer_het_group=trainer_group,
        engine_het_group=engine_group,
        trainer_ranks=trainer_ranks,
        engines=engines,
        engine_tp=d.engine_tp,
        engines_per_node=d.engines_per_node,
        ports=job_ports,
        weight_update_groups=groups,
        warnings=(*spec.notes, *d.warnings),
        unchecked=tuple(d.unchecked),
    )


def trainer_mesh(spec: Spec, world_size: int, model_dir: str | None = None) -> TrainerMesh:
    """The trainers' mesh over ``world_size`` ranks, checked by the planner's mesh rules.

    The training backends build their process groups from this, so the layout a
    run trains with is the one ``miles plan`` showed and checked. At run time
    ``model_dir`` names the directory the actor loads (the built-in model is only
    written then), so the rules that need the model's shape are checked against it.
    Raises :class:`~miles.plan.rules.PlanError` with the fix.
    """
    model = spec.model if model_dir is None else dataclasses.replace(spec.model, hf_checkpoint=model_dir, builtin="")
    dp, etp = mesh_rules(spec, model_shape(model), world_size)
    return _mesh(spec, dp, etp, world_size)


def _mesh(spec: Spec, dp: int, etp: int, world_size: int) -> TrainerMesh:
    p = spec.perf
    return TrainerMesh(
        backend=p.backend,
        tp=p.tp,
        pp=p.pp,
        cp=p.cp,
        dp=dp,
        ep=p.ep,
        etp=etp,
        expert_dp=world_size // (etp * p.ep * p.pp),
        world_size=world_size,
    )


def _trainer_ranks(mesh: TrainerMesh, per_node: int, first_gpu: int = 0) -> tuple[TrainerRank, ...]:
    # Megatron's default order tp-cp-ep-dp-pp: tp fastest, pp slowest.
    tp, cp, dp = mesh.tp, mesh.cp, mesh.dp
    tp_cp = tp * cp
    tp_cp_dp = tp_cp * dp
    return tuple(
        TrainerRank(
            rank=r,
            node=r // per_node,
            local_rank=r % per_node,
            gpu=first_gpu + r % per_node,
            tp=r % tp,
            cp=(r // tp) % cp,
            dp=(r // tp_cp) % dp,
            pp=r // tp_cp_dp,
        )
        for r in range(mesh.world_size)
    )


def _engines(d: Derived, het_group: int) -> tuple[Engine, ...]:
    tp, per_node = d.engine_tp, d.engines_per_node
    count = d.rollout_gpus // tp
    return tuple(
        Engine(
            index=e,
            tp=tp,
            het_group=het_group,
            node=e // per_node,
            local_index=e % per_node,
            gpus=tuple(range((e % per_node) * tp, (e % per_node + 1) * tp)),
            ranks=tuple(range(1 + e * tp, 1 + (e + 1) * tp)),
        )
        for e in range(count)
    )


def _ports(job_id: int | None, pp: int, engines: tuple[Engine, ...], engines_per_node: int) -> Ports:
    base = port_layout.block_base(job_id or 0)
    first_engine = base + port_layout.engine_offset(pp)
    return Ports(
        job_id=job_id,
        base=base,
        master=base + port_layout.MASTER_OFFSET,
        router=base + port_layout.ROUTER_OFFSET,
        weight_update=tuple(base + port_layout.WEIGHT_UPDATE_OFFSET + s for s in range(pp)),
        engine_http=tuple(first_engine + 2 * e.local_index for e in engines),
        engine_nccl=tuple(first_engine + 2 * e.local_index + 1 for e in engines),
    )


def _weight_update_groups(
    mesh: TrainerMesh, engines: tuple[Engine, ...], job_ports: Ports
) -> tuple[WeightUpdateGroup, ...]:
    # One group per PP stage: the stage's rank with tp = cp = dp = 0 owns its
    # layers' full weights after gathering TP/EP shards, and broadcasts them.
    offsets = tuple(e.ranks[0] for e in engines)
    world = 1 + sum(e.tp for e in engines)
    stage_stride = mesh.tp * mesh.cp * mesh.dp
    return tuple(
        WeightUpdateGroup(
            pp_stage=s,
            source_rank=s * stage_stride,
            port=job_ports.weight_update[s],
            world_size=world,
            engine_rank_offsets=offsets,
        )
        for s in range(mesh.pp)
    )
