"""Every arithmetic and safety rule of a layout, each with a message that says what to change.

The rules run before anything is laid out, and they collect *all* problems of
a spec instead of stopping at the first, so one ``miles validate`` shows the
user everything to fix. Each message names the spec field(s) involved and the
fix; ``tests/unit/plan/test_rules.py`` has one test per rule asserting both.

The Megatron rules are Megatron-core's own (``initialize_model_parallel`` and
``validate_args``): the dense mesh is ``TP x CP x DP x PP = world``; the expert
mesh is ``ETP x EP x expert-DP x PP = world``, i.e. ``ETP x EP`` must divide
``TP x CP x DP``; ``num_experts % EP == 0``; MoE with TP > 1 needs sequence
parallelism; attention heads and KV heads (query groups) divide by TP.

Rules about the spec's fields alone (a container runtime needs an image,
dynamic batching needs a token budget, env names, FSDP is data parallel only,
...) are the spec's (``miles.spec.rules``), stated there once and checked when
the spec loads; the rules here need the layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from miles.errors import UserError
from miles.plan import ports
from miles.plan.shape import ModelShape, model_shape
from miles.spec.rules import SLURM_MEM, SLURM_TIME_SYNTAX, slurm_time_seconds
from miles.spec.tables import Spec


class PlanError(UserError):
    """The spec cannot be laid out (or rendered) as written; the message lists every fix."""


# Values that end up in ``#SBATCH`` lines. Those lines are parsed by sbatch,
# not by the shell, with its own tokenizer (whitespace splits, quotes and ``#``
# are special) and a newline would end the comment and start a shell line. So
# instead of quoting, only a conservative alphabet is allowed.
_DIRECTIVE_SAFE = re.compile(r"^[A-Za-z0-9._+\-/@:,=~]+\Z")
_CONSTRAINT_SAFE = re.compile(r"^[A-Za-z0-9._+\-@:,=~&|()\[\]*!]+\Z")


def directive_problem(value: str, *, kind: str = "plain") -> str | None:
    """Why ``value`` cannot go into an ``#SBATCH`` line, or None when it can."""
    if kind == "time":
        return None if slurm_time_seconds(value) is not None else f"is not a Slurm time (use {SLURM_TIME_SYNTAX})"
    if kind == "mem":
        return None if SLURM_MEM.match(value) else "is not a Slurm memory size (0, 512G, 2000M, ...)"
    pattern = _CONSTRAINT_SAFE if kind == "constraint" else _DIRECTIVE_SAFE
    if pattern.match(value):
        return None
    return (
        "contains characters that cannot go into an #SBATCH line (spaces, quotes, newlines, $, `, #, %, ...); "
        "use only letters, digits and . _ + - / @ : , = ~"
    )


@dataclass
class Derived:
    """Numbers the rules derived, handed to the planner once every rule passed."""

    shape: ModelShape
    device: str
    trainer_nodes: int
    trainer_gpus_per_node: int
    trainer_gpus: int
    dp: int
    etp: int
    rollout_gpus: int
    rollout_nodes: int
    rollout_gpus_per_node: int
    engine_tp: int
    engines_per_node: int
    trainer_cpus_per_task: int
    engine_cpus_per_task: int
    one_node: bool = False
    """Split mode whose engines and trainers fit one node together: one plain job, disjoint GPU sets."""
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)


class _Report:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.unchecked: list[str] = []

    def error(self, msg: str) -> None:
        self.errors.append(msg)


def _check_text(spec: Spec, r: _Report) -> None:
    """Directive-bound values, env values, setup lines and container mounts (what goes into the script)."""
    s, c = spec.slurm, spec.cluster
    run_dir = spec.run.run_dir or f"runs/{spec.run.name}"
    directive_fields: list[tuple[str, str, str]] = [
        ("run.name", spec.run.name, "plain"),
        ("run.run_dir" if spec.run.run_dir else "run.name (default run_dir runs/<name>)", run_dir, "plain"),
        ("slurm.partition", s.partition, "plain"),
        ("slurm.rollout_partition", s.rollout_partition, "plain"),
        ("slurm.account", s.account, "plain"),
        ("slurm.qos", s.qos, "plain"),
        ("slurm.reservation", s.reservation, "plain"),
        ("slurm.constraint", s.constraint, "constraint"),
        ("slurm.time", s.time, "time"),
        ("cluster.mem_per_node", c.mem_per_node, "mem"),
    ]
    for name, value, kind in directive_fields:
        if name in ("run.name", "slurm.time", "cluster.mem_per_node") or value:
            problem = directive_problem(value, kind=kind)
            if problem:
                r.error(f"{name} = {value!r} {problem}. Fix: change {name.split(' ')[0]}.")
    for key, value in s.env.items():  # the names are a field rule of the spec (miles.spec.rules)
        if "\x00" in value:
            r.error(f"slurm.env.{key} contains a NUL byte, which no environment variable can hold. Fix: remove it.")
    for i, line in enumerate(s.setup):
        if "\n" in line or "\r" in line:
            r.error(
                f"slurm.setup[{i}] contains a newline; each list element is one shell line. "
                "Fix: split it into several elements of slurm.setup."
            )
    for name, values in (("slurm.modules", s.modules), ("slurm.container_mounts", s.container_mounts)):
        for i, v in enumerate(values):
            if "\x00" in v or "\n" in v:
                r.error(f"{name}[{i}] contains a newline or NUL byte. Fix: remove it from {name}[{i}].")
    for name, value in (("slurm.python", s.python), ("slurm.container_image", s.container_image)):
        if "\x00" in value or "\n" in value:
            r.error(f"{name} contains a newline or NUL byte. Fix: remove it.")
    if not s.python:
        r.error(
            "slurm.python is empty. Fix: set slurm.python to the interpreter that has miles installed (e.g. python3)."
        )
    for i, m in enumerate(s.container_mounts):
        if "," in m or not m.strip():
            r.error(
                f"slurm.container_mounts[{i}] = {m!r}: each element is one mount SRC[:DST[:FLAGS]] without commas "
                "(pyxis and apptainer split on commas). Fix: one list element per mount."
            )


def _check_mesh(spec: Spec, shape: ModelShape, trainer_gpus: int, r: _Report) -> tuple[int, int]:
    """Trainer mesh rules; returns (dp, etp), dp = 0 when it is not an integer."""
    # The backend's own limits on [perf] (FSDP is data parallel only, sequence parallelism needs tp > 1) are
    # field rules of the spec (miles.spec.rules); the rules here are about the mesh over the trainer GPUs.
    p = spec.perf
    model_size = p.tp * p.pp * p.cp
    dp = 0
    if trainer_gpus % model_size:
        r.error(
            f"perf.tp x perf.pp x perf.cp = {p.tp} x {p.pp} x {p.cp} = {model_size} does not divide the "
            f"{trainer_gpus} trainer GPUs "
            f"(cluster.actor_num_nodes x cluster.actor_num_gpus_per_node = {spec.cluster.actor_num_nodes} x "
            f"{spec.cluster.actor_num_gpus_per_node}), "
            "so the data-parallel size would not be an integer. Fix: make the trainer GPUs a multiple of "
            f"{model_size}, or change perf.tp/pp/cp."
        )
    else:
        dp = trainer_gpus // model_size
    etp = p.etp if p.etp is not None else p.tp
    experts = shape.num_experts
    if p.ep > 1:
        if experts is None:
            r.unchecked.append(
                f"perf.ep = {p.ep} divides the expert count (model.num_experts unknown: set it in [model])"
            )
        elif experts == 0:
            r.error(
                f"perf.ep = {p.ep} but the model has no experts ({shape.source}). Fix: set perf.ep = 1 for a dense "
                "model."
            )
        elif experts % p.ep:
            r.error(
                f"perf.ep = {p.ep} does not divide model.num_experts = {experts} ({shape.source}). Fix: choose "
                f"perf.ep among the divisors of {experts}."
            )
    if dp and (p.tp * p.cp * dp) % (etp * p.ep):
        r.error(
            f"perf.etp x perf.ep = {etp} x {p.ep} = {etp * p.ep} does not divide perf.tp x perf.cp x DP = {p.tp} x "
            f"{p.cp} x {dp} = {p.tp * p.cp * dp} "
            f"(Megatron: ETP x EP x expert-DP x PP = world size {trainer_gpus}). Fix: choose perf.ep (and perf.etp, "
            "which defaults to perf.tp) "
            f"so that their product divides {p.tp * p.cp * dp}."
        )
    if p.backend == "megatron" and experts and p.tp > 1 and not p.sequence_parallel:
        r.error(
            f"an MoE model ({experts} experts) with perf.tp = {p.tp} needs sequence parallelism in Megatron. Fix: set "
            "perf.sequence_parallel = true."
        )
    if p.backend == "megatron" and p.cp > 1 and p.attention_backend in ("unfused", "local"):
        r.error(
            f"perf.cp = {p.cp} needs miles' context-parallel attention (torch SDPA). "
            'Fix: set perf.attention_backend = "sdpa" (or Miles\' "flash").'
        )
    if p.backend == "megatron":
        _divides(r, shape.num_attention_heads, p.tp, "model.num_attention_heads", "perf.tp", shape.source)
        _divides(r, shape.num_key_value_heads, p.tp, "model.num_key_value_heads", "perf.tp", shape.source)
        layers = shape.num_layers
        if layers is None:
            if p.pp > 1:
                r.unchecked.append(f"perf.pp = {p.pp} against the layer count (model.num_layers unknown)")
        elif p.pp > layers:
            r.error(f"perf.pp = {p.pp} exceeds model.num_layers = {layers}. Fix: set perf.pp <= {layers}.")
        elif layers % p.pp:
            r.error(
                f"perf.pp = {p.pp} does not divide model.num_layers = {layers} ({shape.source}): miles splits the "
                f"layers evenly over the pipeline stages. Fix: choose perf.pp among the divisors of {layers}."
            )
    return dp, etp


def mesh_rules(spec: Spec, shape: ModelShape, trainer_gpus: int) -> tuple[int, int]:
    """The mesh rules alone, for ``trainer_gpus`` ranks: ``(dp, etp)``, or :class:`PlanError` listing the fixes."""
    r = _Report()
    dp, etp = _check_mesh(spec, shape, trainer_gpus, r)
    if r.errors:
        raise PlanError("\n".join(["the trainer mesh cannot be built:", *(f"  - {e}" for e in r.errors)]))
    return dp, etp


def _divides(r: _Report, total: int | None, size: int, total_name: str, size_name: str, source: str) -> None:
    if size == 1:
        return
    if total is None:
        r.unchecked.append(f"{total_name} divisible by {size_name} = {size} ({total_name} unknown: set it in [model])")
    elif total % size:
        r.error(
            f"{total_name} = {total} ({source}) is not divisible by {size_name} = {size}. Fix: choose {size_name} "
            f"among the divisors of {total}."
        )


def _check_batch(spec: Spec, dp: int, r: _Report) -> None:
    t = spec.train
    gbs = t.global_batch_size
    if gbs is None or not dp:
        if gbs is None:
            r.unchecked.append("train.global_batch_size against the data-parallel size (not derived yet)")
        return
    if gbs % dp:
        r.error(
            f"train.global_batch_size = {gbs} is not divisible by the data-parallel size DP = {dp}. Fix: make "
            f"train.global_batch_size a multiple of {dp}."
        )
    elif not t.use_dynamic_batch_size and gbs % (dp * t.micro_batch_size):
        r.error(
            f"train.global_batch_size = {gbs} is not divisible by DP x train.micro_batch_size = {dp} x "
            f"{t.micro_batch_size} = {dp * t.micro_batch_size}. "
            f"Fix: make train.global_batch_size a multiple of {dp * t.micro_batch_size}, change "
            "train.micro_batch_size, or set train.use_dynamic_batch_size = true."
        )


def derive(spec: Spec) -> Derived:
    """Run every rule; raise :class:`PlanError` listing all violations, else return the derived numbers."""
    r = _Report()
    c, sg = spec.cluster, spec.sglang
    _check_text(spec, r)
    shape = model_shape(spec.model)
    gpu = c.gpus_per_node > 0
    device = "gpu" if gpu else "cpu"
    apn = c.actor_num_gpus_per_node
    if gpu and apn > c.gpus_per_node:
        r.error(
            f"cluster.actor_num_gpus_per_node = {apn} exceeds cluster.gpus_per_node = {c.gpus_per_node}. Fix: lower "
            f"it to at most {c.gpus_per_node}, or correct cluster.gpus_per_node."
        )
    trainer_gpus = c.actor_num_nodes * apn
    dp, etp = _check_mesh(spec, shape, trainer_gpus, r)
    _check_batch(spec, dp, r)

    tp_e = sg.rollout_num_gpus_per_engine
    # SGLang's CPU engine ([sglang] device = "cpu") serves on CPU-only nodes too; any other SGLang needs GPUs.
    sglang_on_cpu = sg.server_args.get("device") == "cpu"
    if not gpu:
        if spec.rollout.engine == "sglang" and not sglang_on_cpu:
            r.error(
                'rollout.engine = "sglang" needs GPUs but cluster.gpus_per_node = 0. Fix: set rollout.engine = '
                '"embedded" or cluster.gpus_per_node (or sglang.device = "cpu" for SGLang\'s CPU engine).'
            )
        if c.device == "cuda":
            r.error(
                'cluster.device = "cuda" but cluster.gpus_per_node = 0. Fix: set cluster.gpus_per_node, or '
                'cluster.device = "cpu".'
            )
        if tp_e != 1:
            r.error(
                f"sglang.rollout_num_gpus_per_engine = {tp_e} but on CPU-only nodes (cluster.gpus_per_node = 0) each "
                "engine is one process (one slot). Fix: set sglang.rollout_num_gpus_per_engine = 1."
            )
            tp_e = 1
    elif spec.rollout.engine == "sglang" and c.device == "cpu" and not sglang_on_cpu:
        r.error(
            'rollout.engine = "sglang" cannot run with cluster.device = "cpu". Fix: set cluster.device = "auto", or '
            'rollout.engine = "embedded".'
        )

    if c.mode == "colocate":
        if c.rollout_num_nodes is not None:
            r.error(
                'cluster.rollout_num_nodes is set but cluster.mode = "colocate" runs the engines on the trainer '
                'nodes. Fix: remove cluster.rollout_num_nodes, or set cluster.mode = "split".'
            )
        if c.rollout_num_gpus is not None and c.rollout_num_gpus != trainer_gpus:
            r.error(
                f"cluster.rollout_num_gpus = {c.rollout_num_gpus} but colocated engines share the {trainer_gpus} "
                "trainer GPUs "
                "(cluster.actor_num_nodes x cluster.actor_num_gpus_per_node). Fix: remove cluster.rollout_num_gpus "
                f"or set it to {trainer_gpus}."
            )
        rollout_gpus, rollout_nodes, rollout_gpn = trainer_gpus, c.actor_num_nodes, apn
        if apn % tp_e:
            r.error(
                f"sglang.rollout_num_gpus_per_engine = {tp_e} does not divide cluster.actor_num_gpus_per_node = "
                f"{apn}, so an engine would straddle nodes. "
                f"Fix: choose a rollout_num_gpus_per_engine that divides {apn}."
            )
    else:
        rollout_gpus, rollout_nodes, rollout_gpn = _rollout_split(spec, tp_e, r)
    engines_per_node = rollout_gpn // tp_e if rollout_gpn % tp_e == 0 else 0
    if rollout_gpus and rollout_gpus % tp_e:
        r.error(
            f"sglang.rollout_num_gpus_per_engine = {tp_e} does not divide the {rollout_gpus} rollout GPUs. Fix: make "
            f"the rollout GPUs a multiple of {tp_e}."
        )
    if gpu:
        _divides(
            r,
            shape.num_attention_heads,
            tp_e,
            "model.num_attention_heads",
            "sglang.rollout_num_gpus_per_engine",
            shape.source,
        )
        kv = shape.num_key_value_heads
        if kv is not None and tp_e > 1 and kv % tp_e and tp_e % kv:
            r.error(
                f"model.num_key_value_heads = {kv} ({shape.source}) and sglang.rollout_num_gpus_per_engine = {tp_e}: "
                "SGLang needs one to divide the other. "
                "Fix: choose an engine TP that divides the KV heads or is a multiple of them."
            )
    need = ports.ports_needed(spec.perf.pp, engines_per_node)
    if need > ports.STRIDE:
        r.error(
            f"this layout needs {need} ports per job (perf.pp = {spec.perf.pp} weight-update groups + 2 per engine x "
            f"{engines_per_node} engines per node) "
            f"but a job's port block has {ports.STRIDE}. Fix: raise sglang.rollout_num_gpus_per_engine or lower "
            "perf.pp."
        )

    one_node = (
        c.mode == "split"
        and gpu
        and c.actor_num_nodes == 1
        and rollout_nodes == 1
        and trainer_gpus + rollout_gpus <= c.gpus_per_node
    )
    trainer_tasks = apn
    engine_tasks = max(engines_per_node, 1)
    trainer_cpt = engine_cpt = 0
    if c.cpus_per_node:
        alloc_tasks = trainer_tasks
        trainer_cpt = c.cpus_per_node // trainer_tasks
        engine_cpt = c.cpus_per_node // engine_tasks
        if one_node:
            alloc_tasks = trainer_tasks + engine_tasks
            trainer_cpt = engine_cpt = c.cpus_per_node // alloc_tasks
        elif c.mode == "split":
            alloc_tasks = max(trainer_tasks, engine_tasks)
        if c.cpus_per_node < alloc_tasks:
            r.error(
                f"cluster.cpus_per_node = {c.cpus_per_node} is fewer than the {alloc_tasks} tasks per node. Fix: "
                f"raise cluster.cpus_per_node to at least {alloc_tasks}, or set it to 0 (site default)."
            )
    if c.mode == "colocate" and gpu and spec.rollout.engine == "sglang":
        mfs = sg.mem_fraction_static
        if mfs is None or mfs > 0.8:
            r.warnings.append(
                "colocated SGLang engines share GPU memory with the trainers: set sglang.mem_fraction_static (Miles "
                "uses 0.4-0.7) "
                "so that the trainer fits next to the engine."
            )
    if c.mode == "split" and not one_node:
        r.warnings.append(
            "split mode submits a heterogeneous job: Slurm schedules het jobs only with the backfill scheduler, "
            "starts all "
            "components together, and counts each component as a job against QOS/association limits (docs/admin.md)."
        )
    if r.errors:
        head = f"{spec.source or 'the spec'}: {len(r.errors)} problem(s) in the layout:"
        raise PlanError("\n".join([head, *(f"  - {e}" for e in r.errors)]))
    return Derived(
        shape=shape,
        device=device,
        trainer_nodes=c.actor_num_nodes,
        trainer_gpus_per_node=apn,
        trainer_gpus=trainer_gpus,
        dp=dp,
        etp=etp,
        rollout_gpus=rollout_gpus,
        rollout_nodes=rollout_nodes,
        rollout_gpus_per_node=rollout_gpn,
        engine_tp=tp_e,
        engines_per_node=engines_per_node,
        trainer_cpus_per_task=trainer_cpt,
        engine_cpus_per_task=engine_cpt,
        one_node=one_node,
        warnings=r.warnings,
        unchecked=r.unchecked,
    )


def _rollout_split(spec: Spec, tp_e: int, r: _Report) -> tuple[int, int, int]:
    """Rollout GPUs, nodes and GPUs (slots) per node of the engine component."""
    c = spec.cluster
    gpn, n_gpus, n_nodes = c.gpus_per_node, c.rollout_num_gpus, c.rollout_num_nodes
    if n_gpus is None and n_nodes is None:
        r.error(
            'cluster.mode = "split" needs the engines\' size. Fix: set cluster.rollout_num_nodes (whole nodes) or '
            "cluster.rollout_num_gpus."
        )
        return 0, 0, 0
    if gpn == 0:
        # CPU-only: one slot per engine; slots spread evenly over the nodes.
        nodes = n_nodes or 1
        slots = n_gpus if n_gpus is not None else nodes
        if slots % nodes:
            r.error(
                f"cluster.rollout_num_gpus = {slots} engine slots do not spread evenly over cluster.rollout_num_nodes "
                f"= {nodes}. Fix: make it a multiple of {nodes}."
            )
            return slots, nodes, 0
        return slots, nodes, slots // nodes
    if n_gpus is None:
        assert n_nodes is not None
        total, nodes = n_nodes * gpn, n_nodes
    elif n_nodes is None:
        total, nodes = n_gpus, -(-n_gpus // gpn)
        if nodes > 1 and n_gpus % gpn:
            r.error(
                f"cluster.rollout_num_gpus = {n_gpus} spans {nodes} nodes of {gpn} GPUs without filling them; Slurm "
                "gives every node of a "
                f"component the same GPU count. Fix: set cluster.rollout_num_gpus to a multiple of {gpn}."
            )
    else:
        total, nodes = n_gpus, n_nodes
        if n_gpus > n_nodes * gpn:
            r.error(
                f"cluster.rollout_num_gpus = {n_gpus} does not fit cluster.rollout_num_nodes = {n_nodes} x "
                f"cluster.gpus_per_node = {gpn}. Fix: raise rollout_num_nodes to {-(-n_gpus // gpn)} or lower "
                "rollout_num_gpus."
            )
        elif n_gpus % n_nodes:
            r.error(
                f"cluster.rollout_num_gpus = {n_gpus} does not spread evenly over cluster.rollout_num_nodes = "
                f"{n_nodes}. Fix: make rollout_num_gpus a multiple of {n_nodes}, or remove one of the two."
            )
    per_node = min(total, gpn) if nodes <= 1 else total // max(nodes, 1)
    if tp_e > gpn:
        r.error(
            f"sglang.rollout_num_gpus_per_engine = {tp_e} exceeds cluster.gpus_per_node = {gpn}; miles does not run "
            "an engine across nodes. "
            f"Fix: set rollout_num_gpus_per_engine <= {gpn}."
        )
    elif per_node % tp_e:
        r.error(
            f"sglang.rollout_num_gpus_per_engine = {tp_e} does not divide the {per_node} engine GPUs per node, so an "
            "engine would straddle nodes. "
            f"Fix: choose a rollout_num_gpus_per_engine that divides {per_node}."
        )
    return total, nodes, per_node
