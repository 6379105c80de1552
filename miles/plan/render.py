"""Human and machine views of a Plan: the validate summary, the ``miles plan`` tables, JSON.

``to_json``/``from_json`` are the format of ``<run_dir>/plan.json``, which
every rank reads at start; they round-trip exactly. The tables abbreviate the
rank map of big jobs (first and last rows) so that ``miles plan`` of a
1024-node job stays readable and fast.
"""

from __future__ import annotations

import io
import json
import shlex
from dataclasses import fields
from typing import Any

from rich.console import Console
from rich.table import Table

from miles.plan.engine_argv import plan_argvs
from miles.plan.model import Component, Engine, Plan, Ports, TrainerMesh, TrainerRank, WeightUpdateGroup
from miles.spec.tables import Spec

FORMAT = 1
"""Version of the plan.json layout; bumped on incompatible changes."""

_ROWS_SHOWN = 8
"""Rows shown at each end of an abbreviated table."""


def _plain(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_plain(x) for x in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
    return obj


def to_json(plan: Plan) -> str:
    """The plan as JSON (``plan.json``): one top-level key per line, one record (rank, engine, group) per line.

    Hand-laid-out rather than ``indent=``: json's indenting encoder is pure
    Python and took most of ``miles plan --json`` for 1024-node jobs.
    """
    encode = json.JSONEncoder(separators=(",", ":")).encode
    rank_names = [f.name for f in fields(TrainerRank)]
    items: dict[str, Any] = {"format": FORMAT}
    for f in fields(plan):
        if f.name == "trainer_ranks":
            items[f.name] = [{n: getattr(r, n) for n in rank_names} for r in plan.trainer_ranks]
        else:
            items[f.name] = _plain(getattr(plan, f.name))
    items["trainer_gpus"] = plan.trainer_gpus
    items["rollout_gpus"] = plan.rollout_gpus
    lines = []
    for key, value in items.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            body = ",\n  ".join(encode(v) for v in value)
            lines.append(f' "{key}": [\n  {body}\n ]')
        else:
            lines.append(f' "{key}": {encode(value)}')
    return "{\n" + ",\n".join(lines) + "\n}"


def from_json(text: str) -> Plan:
    """Rebuild a Plan from :func:`to_json`'s output."""
    raw = json.loads(text)
    if raw.get("format") != FORMAT:
        raise ValueError(f"plan.json format {raw.get('format')!r}, this miles reads format {FORMAT}")

    def tup(x: Any) -> Any:
        return tuple(x) if isinstance(x, list) else x

    def build(cls: Any, d: dict[str, Any]) -> Any:
        return cls(**{k: tup(v) for k, v in d.items()})

    return Plan(
        name=raw["name"],
        run_dir=raw["run_dir"],
        mode=raw["mode"],
        device=raw["device"],
        components=tuple(build(Component, c) for c in raw["components"]),
        mesh=build(TrainerMesh, raw["mesh"]),
        trainer_het_group=raw["trainer_het_group"],
        engine_het_group=raw["engine_het_group"],
        trainer_ranks=tuple(TrainerRank(**r) for r in raw["trainer_ranks"]),
        engines=tuple(build(Engine, e) for e in raw["engines"]),
        engine_tp=raw["engine_tp"],
        engines_per_node=raw["engines_per_node"],
        ports=build(Ports, raw["ports"]),
        weight_update_groups=tuple(build(WeightUpdateGroup, g) for g in raw["weight_update_groups"]),
        warnings=tuple(raw["warnings"]),
        unchecked=tuple(raw["unchecked"]),
    )


def _unit(plan: Plan) -> str:
    return "GPU" if plan.device == "gpu" else "slot"


def _mesh_text(plan: Plan) -> str:
    m = plan.mesh
    if m.backend == "fsdp":
        return f"fsdp DP{m.dp}"
    text = f"megatron TP{m.tp} PP{m.pp} CP{m.cp} DP{m.dp}"
    if m.ep > 1 or m.etp != m.tp:
        text += f" EP{m.ep} ETP{m.etp} expert-DP{m.expert_dp}"
    return text


def summary(spec: Spec, plan: Plan) -> str:
    """One paragraph for ``miles validate``: what will run where, and what was not checked."""
    unit = _unit(plan)
    parts = []
    for comp in plan.components:
        per = f"{comp.gpus_per_node} {unit}s" if plan.device == "gpu" else f"{comp.tasks_per_node} {unit}s"
        parts.append(f"{comp.role} {comp.nodes} node(s) x {per}")
    t, r = spec.train, spec.rollout
    total = (r.rollout_batch_size or 0) * (r.n_samples_per_prompt or 0)
    knobs = (
        f"{r.rollout_batch_size} prompts x {r.n_samples_per_prompt} samples = {total or '?'} = "
        f"{t.global_batch_size} per step x {t.num_steps_per_rollout} step(s)"
    )
    kind = "het job, " if len(plan.components) > 1 else ("one node, " if plan.mode == "split" else "")
    lines = [
        f"valid: {spec.source or plan.name}: {plan.mode} ({kind}{', '.join(parts)}); "
        f"trainers {plan.mesh.world_size} rank(s), {_mesh_text(plan)}; "
        f"{len(plan.engines)} {spec.rollout.engine} engine(s) of {plan.engine_tp} {unit}(s); "
        f"batch {knobs}; {len(plan.weight_update_groups)} weight-update group(s) of "
        f"{plan.weight_update_groups[0].world_size} ranks."
    ]
    filling = rollout_filling(spec)
    if filling:
        lines.append(filling)
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    for u in plan.unchecked:
        lines.append(f"unchecked: {u}")
    return "\n".join(lines)


def rollout_filling(spec: Spec) -> str:
    """How dynamic sampling and over-sampling change what is generated (empty when neither is set).

    Training still consumes ``rollout_batch_size x n_samples_per_prompt`` samples (the four knobs);
    the engines generate more: whole rounds of ``over_sampling_batch_size`` prompts.
    """
    r = spec.rollout
    if not r.dynamic_sampling_filter_path and r.over_sampling_batch_size is None:
        return ""
    n = r.n_samples_per_prompt or 1
    per_round = r.over_sampling_batch_size or r.rollout_batch_size or 0
    judge = (
        f"pass the filter {r.dynamic_sampling_filter_path} (another round of {per_round} prompts while fewer "
        "pass, at most one pass over the data per rollout)"
        if r.dynamic_sampling_filter_path
        else "come back first in draw order"
    )
    surplus = (
        "requests still running when the batch is full are aborted and kept with their tokens so far; the next "
        "rollout continues those groups first (partial_rollout"
        + (", only the on-policy tail trained)." if r.mask_offpolicy_in_partial_rollout else ").")
        if r.partial_rollout
        else "requests still running when the batch is full are aborted."
    )
    return (
        f"rollout filling: each rollout sends rounds of {per_round} prompts x {n} samples = {per_round * n} "
        f"generations and trains on the first {r.rollout_batch_size} groups that {judge}; {surplus}"
    )


def _abbreviated(n: int) -> list[int | None]:
    """Row indices to show, ``None`` standing for the elided middle."""
    if n <= 4 * _ROWS_SHOWN:
        return list(range(n))
    return [*range(_ROWS_SHOWN), None, *range(n - _ROWS_SHOWN, n)]


def _engine_commands(console: Console, spec: Spec, plan: Plan) -> None:
    """Each engine's exact command line (the first and last of a big job), so pass-through flags can be checked."""
    n = len(plan.engines)
    shown = _abbreviated(n) if n <= 4 * _ROWS_SHOWN else [0, None, n - 1]
    argvs = iter(plan_argvs(spec, plan, [i for i in shown if i is not None]))
    python = "MILES_SGLANG_PYTHON when set, else " if spec.rollout.engine == "sglang" else ""
    console.print(
        f"Engine command lines ({spec.rollout.engine}; GPUs by CUDA_VISIBLE_DEVICES; interpreter: "
        f"{python}[slurm] python; ports of the job id below):"
    )
    for i in shown:
        if i is None:
            console.print("  ...")
            continue
        e = plan.engines[i]
        gpus = ",".join(map(str, e.gpus))
        console.print(
            f"  engine {e.index} (node {e.node}, {_unit(plan)}s {gpus}): {shlex.join(next(argvs))}", soft_wrap=True
        )


def render_table(spec: Spec, plan: Plan) -> str:
    """The ``miles plan`` view: components, mesh, engines and their command lines, rank map, ports, weight-update
    groups."""
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False, color_system=None, highlight=False, markup=False)
    unit = _unit(plan)
    console.print(f"{plan.name}  mode={plan.mode}  run_dir={plan.run_dir}  device={plan.device}")
    filling = rollout_filling(spec)
    if filling:
        console.print(filling)

    t = Table(title="Slurm components", title_justify="left")
    for col in ("het group", "role", "partition", "nodes", f"{unit}s/node", "tasks/node", "cpus/task", "mem"):
        t.add_column(col)
    for comp in plan.components:
        t.add_row(
            str(comp.het_group),
            comp.role,
            comp.partition or "(default)",
            str(comp.nodes),
            str(comp.gpus_per_node if plan.device == "gpu" else comp.tasks_per_node),
            str(comp.tasks_per_node),
            str(comp.cpus_per_task or "(site)"),
            comp.mem,
        )
    console.print(t)

    m = plan.mesh
    t = Table(title="Trainer mesh", title_justify="left")
    for col in ("backend", "world", "TP", "PP", "CP", "DP", "EP", "ETP", "expert-DP"):
        t.add_column(col)
    t.add_row(
        m.backend,
        str(m.world_size),
        str(m.tp),
        str(m.pp),
        str(m.cp),
        str(m.dp),
        str(m.ep),
        str(m.etp),
        str(m.expert_dp),
    )
    console.print(t)

    t = Table(title=f"Trainer ranks (het group {plan.trainer_het_group})", title_justify="left")
    for col in ("rank", "node", "local", unit, "tp", "pp", "cp", "dp"):
        t.add_column(col)
    for i in _abbreviated(len(plan.trainer_ranks)):
        if i is None:
            t.add_row("...", "", "", "", "", "", "", "")
            continue
        r = plan.trainer_ranks[i]
        t.add_row(str(r.rank), str(r.node), str(r.local_rank), str(r.gpu), str(r.tp), str(r.pp), str(r.cp), str(r.dp))
    console.print(t)

    t = Table(
        title=f"Engines ({len(plan.engines)} x TP{plan.engine_tp}, het group {plan.engine_het_group})",
        title_justify="left",
    )
    for col in ("engine", "node", f"{unit}s", "group ranks", "http port", "nccl port"):
        t.add_column(col)
    for i in _abbreviated(len(plan.engines)):
        if i is None:
            t.add_row("...", "", "", "", "", "")
            continue
        e = plan.engines[i]
        t.add_row(
            str(e.index),
            str(e.node),
            ",".join(map(str, e.gpus)),
            f"{e.ranks[0]}-{e.ranks[-1]}",
            str(plan.ports.engine_http[i]),
            str(plan.ports.engine_nccl[i]),
        )
    console.print(t)

    _engine_commands(console, spec, plan)

    p = plan.ports
    job = str(p.job_id) if p.job_id is not None else "placeholder 0 (the job uses its SLURM_JOB_ID)"
    t = Table(title=f"Ports (job id {job})", title_justify="left")
    for col in ("MASTER_PORT", "router", "weight update", "engine http/nccl base"):
        t.add_column(col)
    first_engine = f"{p.engine_http[0]}/{p.engine_nccl[0]} (+2 per engine on a node)" if p.engine_http else "-"
    t.add_row(str(p.master), str(p.router), ",".join(map(str, p.weight_update)), first_engine)
    console.print(t)

    t = Table(title="Weight-update groups (trainer source rank + every engine GPU)", title_justify="left")
    for col in ("pp stage", "source rank", "port", "world size", "engine rank offsets"):
        t.add_column(col)
    for g in plan.weight_update_groups:
        offs = g.engine_rank_offsets
        shown = ",".join(map(str, offs)) if len(offs) <= 16 else ",".join(map(str, offs[:8])) + ",...," + str(offs[-1])
        t.add_row(str(g.pp_stage), str(g.source_rank), str(g.port), str(g.world_size), shown)
    console.print(t)
    for w in plan.warnings:
        console.print(f"warning: {w}")
    for u in plan.unchecked:
        console.print(f"unchecked: {u}")
    return out.getvalue()
