"""The planner: a run spec laid out on Slurm nodes and GPUs, and rendered to sbatch.

``make_plan`` is pure (no writes, no env, no subprocess; it only reads the
model's config.json when that is readable) and never imports torch, so
``miles validate``, ``miles plan`` and ``miles submit --dry-run`` run on any
login node in a fraction of a second.
"""

from __future__ import annotations

from miles.plan.model import Component, Engine, Plan, Ports, TrainerMesh, TrainerRank, WeightUpdateGroup
from miles.plan.planner import make_plan, run_dir_of, trainer_mesh
from miles.plan.render import from_json, render_table, summary, to_json
from miles.plan.rules import PlanError
from miles.plan.script import render_script

__all__ = [
    "Component",
    "Engine",
    "Plan",
    "PlanError",
    "Ports",
    "TrainerMesh",
    "TrainerRank",
    "WeightUpdateGroup",
    "from_json",
    "make_plan",
    "render_script",
    "render_table",
    "run_dir_of",
    "summary",
    "to_json",
    "trainer_mesh",
]
