"""The run spec's tables: one typed, frozen config dataclass per concern.

Each table mirrors one of Miles' argument groups and its keys mirror Miles'
flags (``--rollout-batch-size`` becomes ``[rollout] rollout_batch_size``), so a
Miles user can translate a launch script line by line. Defaults are Miles'
defaults where Miles has one.

Conventions the loader (``miles.spec.loader``) relies on:

* every table is ``@dataclass(**TABLE_ARGS)`` (``miles.spec.table``: keyword-only, frozen, slots);
* every field has an attribute docstring directly below it; ``docs/spec.md`` is
  generated from these docstrings, so they are the user-facing reference;
* ``Literal[...]`` types are closed choices;
* numeric ranges live in ``field(metadata={"ge": ..., "gt": ..., "le": ...})``;
* ``None`` means "not set by the user" (the four knobs use this to tell which
  one to derive).

This module must stay importable without torch: the planner path
(``miles validate``, ``miles plan``, ``miles submit --dry-run``) imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from miles.spec.rl_tables import (
    CkptConfig,
    EvalConfig,
    GrpoConfig,
    MiB,
    ModelConfig,
    OptimizerConfig,
    RolloutConfig,
    RunConfig,
    TrainConfig,
)
from miles.spec.system_tables import ClusterConfig, PerfConfig, SglangConfig, SlurmConfig
from miles.spec.table import TABLE_ARGS

__all__ = [
    "TABLES",
    "ClusterConfig",
    "CkptConfig",
    "EvalConfig",
    "GrpoConfig",
    "MiB",
    "ModelConfig",
    "OptimizerConfig",
    "PerfConfig",
    "RolloutConfig",
    "RunConfig",
    "SglangConfig",
    "SlurmConfig",
    "Spec",
    "TrainConfig",
]


@dataclass(**TABLE_ARGS)
class Spec:
    """A whole run spec: one instance of each table, plus where it came from."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sglang: SglangConfig = field(default_factory=SglangConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    source: str = ""
    """Path of the TOML file this spec was loaded from (not a TOML key)."""
    notes: tuple[str, ...] = field(default=(), compare=False)
    """Choices the loader made for keys left out (e.g. ``[cluster] mode``), shown with the plan (not a TOML key)."""


TABLES: dict[str, type] = {
    "run": RunConfig,
    "model": ModelConfig,
    "ckpt": CkptConfig,
    "rollout": RolloutConfig,
    "eval": EvalConfig,
    "train": TrainConfig,
    "perf": PerfConfig,
    "grpo": GrpoConfig,
    "optimizer": OptimizerConfig,
    "sglang": SglangConfig,
    "cluster": ClusterConfig,
    "slurm": SlurmConfig,
}
"""Table name in TOML -> its dataclass, in the order docs/spec.md lists them."""
