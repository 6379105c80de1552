"""Spec builders for the planner tests: a valid baseline per mode, changed field by field."""

from __future__ import annotations

import dataclasses
from typing import Any

from miles.spec.tables import (
    ClusterConfig,
    ModelConfig,
    PerfConfig,
    RolloutConfig,
    RunConfig,
    SglangConfig,
    SlurmConfig,
    Spec,
    TrainConfig,
)


def spec(mode: str = "split", **tables: dict[str, Any]) -> Spec:
    """A valid spec (Qwen3-8B-like shape, 8-GPU nodes), with ``tables`` overriding fields per table."""
    base = Spec(
        run=RunConfig(name="t", run_dir="/shared/runs/t", num_rollout=10),
        model=ModelConfig(
            hf_checkpoint="/nonexistent/model",
            num_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_experts=0,
        ),
        rollout=RolloutConfig(
            engine="sglang", prompt_data="/d.jsonl", rm_type="math", rollout_batch_size=32, n_samples_per_prompt=8
        ),
        train=TrainConfig(global_batch_size=64, num_steps_per_rollout=4),
        perf=PerfConfig(backend="megatron", tp=2, sequence_parallel=True),
        sglang=SglangConfig(rollout_num_gpus_per_engine=2),
        cluster=ClusterConfig(
            mode=mode,
            gpus_per_node=8,
            actor_num_nodes=1,
            actor_num_gpus_per_node=8,  # type: ignore[arg-type]
            rollout_num_nodes=1 if mode == "split" else None,
        ),
        slurm=SlurmConfig(),
        source="test.toml",
    )
    for table, changes in tables.items():
        base = dataclasses.replace(base, **{table: dataclasses.replace(getattr(base, table), **changes)})
    return base


def cpu_spec(mode: str = "colocate", **tables: dict[str, Any]) -> Spec:
    """A CPU-only spec (gpus_per_node = 0, embedded engines, FSDP)."""
    cluster = {"gpus_per_node": 0, "device": "cpu", "actor_num_gpus_per_node": 2, **tables.pop("cluster", {})}
    if mode == "split":
        cluster.setdefault("rollout_num_gpus", 2)
    else:
        cluster["rollout_num_nodes"] = None
    return spec(
        mode,
        rollout={"engine": "embedded", **tables.pop("rollout", {})},
        perf={"backend": "fsdp", "tp": 1, "sequence_parallel": False, **tables.pop("perf", {})},
        sglang={"rollout_num_gpus_per_engine": 1, **tables.pop("sglang", {})},
        train={"global_batch_size": 64, **tables.pop("train", {})},
        cluster=cluster,
        **tables,
    )
