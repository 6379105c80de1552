"""The colocated tensor sync inside the loop: `miles run` of the CPU quickstart with two FSDP trainer ranks.

Each trainer rank shares its copy of every bucket (shared memory on CPUs) with
the engine on its slot, rank 0 posts the handles, and ``check_weight_sync``
compares every engine's checksums with the actor's after each sync.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.slow


def test_two_trainer_ranks_hand_their_buckets_to_their_engines(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "miles.cli",
        "run",
        str(ROOT / "configs" / "quickstart.toml"),
        "--set",
        f'run.run_dir="{run_dir}"',
        "--set",
        "run.num_rollout=2",
        "--set",
        "run.use_tensorboard=false",
        "--set",
        "ckpt.save_interval=100",
        "--set",
        "rollout.check_weight_sync=true",
        "--set",
        'rollout.weight_sync="tensor"',
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MILES_FAULT", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("weight sync verified: 27 tensors bit-equal on 2 engines") == 2, out[-4000:]
    for i in range(2):
        log = (run_dir / "logs" / f"engine-{i}.log").read_text()
        assert log.count("POST /update_weights_from_tensor") == 2, log[-2000:]
        assert "/init_weights_update_group" not in log


def test_tensor_sync_needs_colocated_engines() -> None:
    from miles.errors import UserError
    from miles.rollout.fleet import weight_sync_kind
    from miles.spec.tables import ClusterConfig, RolloutConfig, Spec

    split = Spec(cluster=ClusterConfig(mode="split"), rollout=RolloutConfig(weight_sync="tensor"))
    with pytest.raises(UserError, match='weight_sync = "tensor" needs'):
        weight_sync_kind(split, "cuda")
    assert weight_sync_kind(Spec(cluster=ClusterConfig(mode="colocate")), "cuda") == "tensor"
    assert weight_sync_kind(Spec(cluster=ClusterConfig(mode="split")), "cuda") == "distributed"
    assert weight_sync_kind(Spec(cluster=ClusterConfig(mode="colocate")), "cpu") == "distributed"
    colocated_cpu = Spec(cluster=ClusterConfig(mode="colocate"), rollout=RolloutConfig(weight_sync="tensor"))
    assert weight_sync_kind(colocated_cpu, "cpu") == "tensor"
