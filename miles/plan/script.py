"""``render_script``: Plan -> the exact sbatch text, from ``miles/templates/*.j2``.

Safety model (what keeps a run name or path from injecting shell):

* every spec value that reaches the shell body goes through the ``q`` filter
  (``shlex.quote``): names, paths, the interpreter, env values, module names,
  container images and mounts;
* values that reach ``#SBATCH`` lines go through the ``directive`` filter,
  which *rejects* anything outside a conservative alphabet with a
  :class:`PlanError` naming the field. sbatch, not the shell, parses those
  lines, so shell quoting would be wrong there, and a newline would turn the
  rest of the value into a shell line;
* ``slurm.setup`` lines are the site admin's own shell and are emitted
  verbatim, one element per line (an element holding a newline is rejected by
  the planner's rules, so one element cannot smuggle in several lines).

Rendering is independent of the job id: the script derives its ports from
``$SLURM_JOB_ID`` at run time with the same formula as :mod:`miles.plan.ports`.
Jinja runs with ``StrictUndefined`` (a missing variable is a bug, not an empty
string) and no autoescaping (this is shell, not HTML).
"""

from __future__ import annotations

import shlex
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from miles.plan import ports
from miles.plan.model import Plan
from miles.plan.rules import PlanError, directive_problem
from miles.spec.tables import Spec

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"


def _quote(value: object) -> str:
    text = str(value)
    if "\x00" in text:
        raise PlanError(f"a value for the script contains a NUL byte: {text!r}. Fix: remove it from the spec.")
    return shlex.quote(text)


def _directive(value: object, field: str, kind: str = "plain") -> str:
    text = str(value)
    problem = directive_problem(text, kind=kind)
    if problem:
        raise PlanError(f"{field} = {text!r} {problem}. Fix: change {field}.")
    return text


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["q"] = _quote
    env.filters["directive"] = _directive
    return env


def _layout_lines(spec: Spec, plan: Plan) -> list[str]:
    unit = "GPU" if plan.device == "gpu" else "slot"
    m = plan.mesh
    mesh = f"fsdp DP{m.dp}" if m.backend == "fsdp" else f"megatron TP{m.tp} PP{m.pp} CP{m.cp} DP{m.dp}"
    if m.backend == "megatron" and (m.ep > 1 or m.etp != m.tp):
        mesh += f" EP{m.ep} ETP{m.etp}"
    engines = f"{len(plan.engines)} {spec.rollout.engine} engine(s) x {plan.engine_tp} {unit}(s)"
    trainers = f"{m.world_size} trainer rank(s), {mesh}"
    lines = []
    for comp in plan.components:
        size = f"{comp.nodes} node(s) x {comp.gpus_per_node if plan.device == 'gpu' else comp.tasks_per_node} {unit}(s)"
        what = {
            "engines": engines,
            "trainers": trainers,
            "colocated": f"{trainers}; {engines}",
            "engines+trainers": f"{engines}; {trainers}",
        }[comp.role]
        lines.append(f"het group {comp.het_group} ({comp.role}): {size}: {what}" if _het(plan) else f"{size}: {what}")
    return lines


def _het(plan: Plan) -> bool:
    """Whether the plan is a heterogeneous job (split over nodes of its own per component)."""
    return len(plan.components) > 1


def _gpu_list(gpus: range) -> str:
    return ",".join(map(str, gpus))


def _steps(plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    split = _het(plan)
    trainers = plan.components[plan.trainer_het_group]
    engines_comp = plan.components[plan.engine_het_group]
    engine_cpus = engines_comp.cpus_per_task
    if not split and trainers.cpus_per_task:
        # colocated engines overlap the trainers' CPUs: give each the node's share per engine
        engine_cpus = trainers.cpus_per_task * trainers.tasks_per_node // max(plan.engines_per_node, 1)
    engine_step = {
        "role": "engine",
        "het_group": plan.engine_het_group if split else None,
        "overlap": not split,
        "nodes": engines_comp.nodes,
        "tasks_per_node": plan.engines_per_node,
        "cpus_per_task": engine_cpus,
    }
    trainer_step = {
        "role": "trainer",
        "het_group": plan.trainer_het_group if split else None,
        "overlap": False,
        "nodes": trainers.nodes,
        "tasks_per_node": trainers.tasks_per_node,
        "cpus_per_task": trainers.cpus_per_task,
        "visible_gpus": "",
    }
    engine_step["visible_gpus"] = ""
    if plan.mode == "split" and not split:
        # One node, disjoint GPU sets: each step sees only its own GPUs (the engines' plan ids index the node).
        rollout, trainer_gpus = plan.rollout_gpus, plan.trainer_gpus
        engine_step.update(
            tasks_per_node=plan.engines_per_node,
            cpus_per_task=trainers.cpus_per_task,
            visible_gpus=_gpu_list(range(rollout)),
        )
        trainer_step.update(tasks_per_node=trainer_gpus, visible_gpus=_gpu_list(range(rollout, rollout + trainer_gpus)))
    return engine_step, trainer_step


def render_script(spec: Spec, plan: Plan) -> str:
    """The exact sbatch script for ``plan`` (what ``miles submit --dry-run`` prints and ``miles submit`` submits)."""
    for key in spec.slurm.env:
        if not key.isidentifier() or not key.isascii():
            raise PlanError(f"slurm.env key {key!r} is not a shell variable name. Fix: use letters, digits and _ only.")
    for i, line in enumerate(spec.slurm.setup):
        if "\n" in line or "\r" in line:
            raise PlanError(f"slurm.setup[{i}] contains a newline. Fix: split it into several elements of slurm.setup.")
    engine_step, trainer_step = _steps(plan)
    context = {
        "plan": plan,
        "slurm": spec.slurm,
        "run_dir": plan.run_dir,
        "env": sorted(spec.slurm.env.items()),
        "unit": "GPU" if plan.device == "gpu" else "slot",
        "layout_lines": _layout_lines(spec, plan),
        "master_nodelist_var": f"SLURM_JOB_NODELIST_HET_GROUP_{plan.trainer_het_group}"
        if _het(plan)
        else "SLURM_JOB_NODELIST",
        "ports": ports,
        "engine_port_offset": ports.engine_offset(plan.mesh.pp),
        "engine_step": engine_step,
        "trainer_step": trainer_step,
    }
    name = "split-one-node" if plan.mode == "split" and not _het(plan) else plan.mode
    template = _environment().get_template(f"{name}.sbatch.j2")
    return template.render(context)
