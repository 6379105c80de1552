"""The run spec: one TOML file, loaded strictly into typed tables.

``load_spec("run.toml", ["rollout.rollout_batch_size=64"])`` returns a checked
:class:`Spec` with the fourth batch knob derived and directories resolved, or
raises :class:`SpecError` listing every problem with its file and line. Nothing
here imports torch: the planner path (``miles validate``/``plan``/``submit
--dry-run``) runs on login nodes.
"""

from miles.spec.loader import load_spec, parse_override, spec_from_dict
from miles.spec.problems import Origin, Problem, SpecError
from miles.spec.tables import (
    TABLES,
    CkptConfig,
    ClusterConfig,
    EvalConfig,
    GrpoConfig,
    ModelConfig,
    OptimizerConfig,
    PerfConfig,
    RolloutConfig,
    RunConfig,
    SglangConfig,
    SlurmConfig,
    Spec,
    TrainConfig,
)
from miles.spec.writer import spec_to_dict, spec_to_toml

__all__ = [
    "TABLES",
    "CkptConfig",
    "ClusterConfig",
    "EvalConfig",
    "GrpoConfig",
    "ModelConfig",
    "OptimizerConfig",
    "Origin",
    "PerfConfig",
    "Problem",
    "RolloutConfig",
    "RunConfig",
    "SglangConfig",
    "SlurmConfig",
    "Spec",
    "SpecError",
    "TrainConfig",
    "load_spec",
    "parse_override",
    "spec_from_dict",
    "spec_to_dict",
    "spec_to_toml",
]
