"""Ranks started by ``mpirun`` (Open MPI) bootstrap from the MPI environment.

One MPMD-style launch of 2 engines + 2 trainers (engines first, as in a het
job), no Slurm. With mpi4py installed the ranks learn trainer rank 0's host and
a shared launch id from an ``allgather``/``bcast``; without it, ``MASTER_ADDR``
must be exported (``-x MASTER_ADDR``) and the launch id comes from PMIx.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from miles.launch.selftest import expected_broadcast
from miles.plan import make_plan, to_json
from miles.spec import spec_to_toml

pytestmark = pytest.mark.slow

SPEC = """
[run]
name = "mpi"
num_rollout = 1
[model]
builtin = "tiny-arith"
dtype = "float32"
[rollout]
engine = "embedded"
prompt_data = "prompts.jsonl"
input_key = "prompt"
label_key = "label"
rollout_batch_size = 4
n_samples_per_prompt = 2
rm_type = "exact_match"
[train]
global_batch_size = 8
[perf]
backend = "fsdp"
[cluster]
mode = "colocate"
gpus_per_node = 0
actor_num_nodes = 1
actor_num_gpus_per_node = 2
device = "cpu"
"""


@pytest.fixture(scope="module")
def mpirun() -> str:
    path = shutil.which("mpirun")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "openmpi-bin"],
            capture_output=True,
            timeout=600,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )
        path = shutil.which("mpirun")
    if path is None:
        reason = "MPI TEST SKIPPED: no mpirun (apt-get install openmpi-bin as root to run it)"
        print(f"\n*** {reason} ***", file=sys.stderr)
        pytest.skip(reason)
    return path


@pytest.mark.parametrize("use_mpi4py", [True, False], ids=["mpi4py", "env-only"])
def test_mpirun_mpmd_selftest(tmp_path: Path, mpirun: str, use_mpi4py: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from miles.spec import load_spec

    if use_mpi4py and importlib.util.find_spec("mpi4py") is None:
        pytest.skip("MPI4PY VARIANT SKIPPED: mpi4py is not installed (pip install -c constraints.txt mpi4py)")
    rows = [{"prompt": f"{a:02d}+{a:02d}=", "label": str(2 * a % 10)} for a in range(20)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.toml").write_text(SPEC)
    monkeypatch.chdir(tmp_path)
    spec = load_spec(str(tmp_path / "run.toml"), [])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.toml").write_text(spec_to_toml(spec))
    (run_dir / "plan.json").write_text(to_json(make_plan(spec)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MILES_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    cmd = [mpirun, "-np", "4", "--allow-run-as-root", "--oversubscribe", "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH"]
    if not use_mpi4py:
        # hide mpi4py from the ranks: the bootstrap must then work from the environment alone
        (tmp_path / "nompi" / "mpi4py").mkdir(parents=True)
        (tmp_path / "nompi" / "mpi4py" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
        env.update(MASTER_ADDR="127.0.0.1", PYTHONPATH=f"{tmp_path / 'nompi'}:{env['PYTHONPATH']}")
        cmd += ["-x", "MASTER_ADDR"]
    cmd += [
        sys.executable,
        "-m",
        "miles.launch.task",
        "--selftest",
        "--run-dir",
        str(run_dir),
        "--engine-deadline",
        "60",
        "--timeout",
        "60",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    reports = {p.stem: json.loads(p.read_text()) for p in (run_dir / "selftest").glob("*.json")}
    assert sorted(reports) == ["engine-0", "engine-1", "trainer-0", "trainer-1"]
    driver = reports["trainer-0"]
    lid = driver["context"]["launch_id"]
    assert driver["context"]["launcher"] == "mpi" and lid.startswith("mpi-")
    assert driver["all_reduce"] == 3 and driver["engines_ok"] == 2
    assert driver["env"]["OMPI_COMM_WORLD_RANK"] == "2"  # engines took MPI ranks 0-1
    for i in range(2):
        assert reports[f"engine-{i}"]["broadcast"] == expected_broadcast(lid)
        assert reports[f"engine-{i}"]["context"]["launch_id"] == lid
