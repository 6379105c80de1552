"""FleetConfig: what the engine fleet reads of the spec, resolved once on the driver."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from miles.errors import UserError
from miles.rollout.fleet import FleetConfig
from miles.spec.tables import ClusterConfig, RolloutConfig, SglangConfig, Spec
from tests.sglang.sglang_servers import driver_task


def test_colocated_gpus_sync_through_cuda_ipc_and_split_gpus_through_nccl(tmp_path: Path) -> None:
    gpu = dataclasses.replace(driver_task(tmp_path, 1), device="cuda", backend="nccl")
    colocated = FleetConfig.from_spec(Spec(cluster=ClusterConfig(mode="colocate")), gpu)
    assert (colocated.sync_kind, colocated.sync_backend, colocated.sync_device) == ("tensor", "gloo", "cpu")
    split = FleetConfig.from_spec(Spec(cluster=ClusterConfig(mode="split")), gpu)
    assert (split.sync_kind, split.sync_backend, split.sync_device) == ("distributed", "nccl", "cuda:0")
    cpu = FleetConfig.from_spec(Spec(), driver_task(tmp_path, 1))
    assert (cpu.sync_kind, cpu.sync_backend, cpu.sync_device) == ("distributed", "gloo", "cpu")


def test_sampling_bucket_and_engine_width_come_from_the_spec(tmp_path: Path) -> None:
    rollout = RolloutConfig(engine="sglang", rollout_temperature=0.7, update_weight_buffer_size=1 << 20)
    spec = Spec(rollout=rollout, sglang=SglangConfig(rollout_num_gpus_per_engine=2))
    cfg = FleetConfig.from_spec(spec, driver_task(tmp_path, 1))
    assert cfg.rollout is rollout and cfg.bucket_bytes == 1 << 20 and cfg.ranks_per_engine == 2
    embedded = dataclasses.replace(spec, rollout=dataclasses.replace(rollout, engine="embedded"))
    assert FleetConfig.from_spec(embedded, driver_task(tmp_path, 1)).ranks_per_engine == 1


def test_tensor_sync_outside_colocation_is_refused_when_the_config_is_built(tmp_path: Path) -> None:
    spec = Spec(rollout=RolloutConfig(weight_sync="tensor"), cluster=ClusterConfig(mode="split"))
    with pytest.raises(UserError, match='weight_sync = "tensor" needs'):
        FleetConfig.from_spec(spec, driver_task(tmp_path, 1))
