"""TaskContext from environment mappings: Slurm (het groups included), torchrun style, MPI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miles.errors import UserError
from miles.job.environment import Layout, detect_launcher, task_context
from miles.job.nodelist import expand_nodelist, first_host
from miles.plan import make_plan, ports, to_json
from miles.spec import load_spec

SPLIT = Layout(
    mode="split",
    trainer_world_size=4,
    num_engines=2,
    master_port=20000,
    weight_update_port=20002,
    engine_http_ports=(20003, 20005),
    engine_rank_offsets=(1, 2),
    engine_het_group=0,
    trainer_het_group=1,
    job_id=None,
)
COLOCATE = Layout(
    mode="colocate",
    trainer_world_size=4,
    num_engines=2,
    master_port=20000,
    weight_update_port=20002,
    engine_http_ports=(20003, 20005),
    engine_tp=2,
    engine_rank_offsets=(1, 3),
)

# What a batch shell of het job 7 (engines on node1, trainers on node[2-3]) exports, plus
# what `srun --het-group=N` adds per task (values seen on the local Slurm 22.05 cluster).
HET_BATCH = {
    "SLURM_JOB_ID": "7",
    "SLURM_HET_SIZE": "2",
    "SLURM_JOB_NODELIST": "node1",
    "SLURM_JOB_NODELIST_HET_GROUP_0": "node1",
    "SLURM_JOB_NODELIST_HET_GROUP_1": "node[2-3]",
    "SLURM_NTASKS_HET_GROUP_0": "2",
    "SLURM_NTASKS_HET_GROUP_1": "4",
    "MILES_JOB_ID": "7",
    "MILES_RESTART_COUNT": "0",
}


def _step(**kw: str) -> dict[str, str]:
    env = dict(HET_BATCH)
    env.update(kw)
    return env


def test_nodelist_expansion() -> None:
    assert expand_nodelist("node[1-3,7]") == ["node1", "node2", "node3", "node7"]
    assert expand_nodelist("gpu-a[01-02],login") == ["gpu-a01", "gpu-a02", "login"]
    assert expand_nodelist("r[1-2]n[3-4]") == ["r1n3", "r1n4", "r2n3", "r2n4"]
    assert first_host("node[10-12]") == "node10"
    with pytest.raises(UserError, match="malformed"):
        expand_nodelist("node[1-")


def test_split_trainer_in_het_group_1() -> None:
    env = _step(
        SLURM_PROCID="3",
        SLURM_NTASKS="4",
        SLURM_LOCALID="1",
        SLURM_NODEID="1",
        SLURM_STEP_NODELIST="node[2-3]",
        SLURMD_NODENAME="node3",
        SLURM_STEP_ID="1",
    )
    ctx = task_context(env, SPLIT, role="trainer", run_dir="/r")
    shift = ports.block_base(7) - ports.block_base(0)
    assert (ctx.role, ctx.rank, ctx.world_size, ctx.local_rank, ctx.node_index) == ("trainer", 3, 4, 1, 1)
    assert ctx.het_group == 1 and ctx.engine_index is None and not ctx.is_driver
    assert (ctx.master_addr, ctx.master_port) == ("node2", 20000 + shift)
    assert (ctx.weight_update_addr, ctx.weight_update_port) == ("node2", 20002 + shift)
    assert ctx.weight_update_rank is None and ctx.weight_update_world_size == 3
    assert (ctx.device, ctx.backend, ctx.launcher, ctx.launch_id) == ("cpu", "gloo", "slurm", "slurm-7.0")


def test_split_engine_in_het_group_0_finds_the_trainers() -> None:
    env = _step(
        SLURM_PROCID="1",
        SLURM_NTASKS="2",
        SLURM_LOCALID="1",
        SLURM_NODEID="0",
        SLURM_STEP_NODELIST="node1",
        SLURMD_NODENAME="node1",
    )
    ctx = task_context(env, SPLIT, role="engine", run_dir="/r")
    shift = ports.block_base(7) - ports.block_base(0)
    assert (ctx.role, ctx.rank, ctx.engine_index, ctx.het_group) == ("engine", 1, 1, 0)
    assert ctx.master_addr == "node2"  # trainer rank 0 sits on the first node of het group 1
    assert ctx.weight_update_rank == 2 and ctx.engine_port == 20005 + shift and ctx.engine_host == "node1"


def test_one_step_spanning_both_components_puts_engines_first() -> None:
    base = dict(SLURM_NTASKS="6", SLURM_STEP_NODELIST="node[1-3]")
    engine = task_context(_step(SLURM_PROCID="1", **base), SPLIT, run_dir="/r")
    trainer = task_context(_step(SLURM_PROCID="2", **base), SPLIT, run_dir="/r")
    assert (engine.role, engine.rank) == ("engine", 1)
    assert (trainer.role, trainer.rank, trainer.is_driver) == ("trainer", 0, True)
    with pytest.raises(UserError, match="is engine, but --role trainer"):
        task_context(_step(SLURM_PROCID="0", **base), SPLIT, role="trainer", run_dir="/r")


def test_colocated_ranks_and_engine_tp_offsets() -> None:
    env = {
        "SLURM_JOB_ID": "12",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_STEP_NODELIST": "node[1-2]",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_RESTART_COUNT": "2",
    }
    t = task_context(env, COLOCATE, role="trainer", run_dir="/r")
    assert t.is_driver and t.weight_update_rank == 0 and t.het_group is None and t.master_addr == "node1"
    assert t.weight_update_world_size == 5 and t.restart_count == 2 and t.launch_id == "slurm-12.2"
    e = task_context({**env, "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, COLOCATE, role="engine", run_dir="/r")
    assert e.weight_update_rank == 3 and e.world_size == 2


def test_batch_shell_exports_win() -> None:
    env = _step(
        SLURM_PROCID="0",
        SLURM_NTASKS="4",
        SLURM_STEP_NODELIST="node[2-3]",
        MILES_MASTER_ADDR="10.0.0.5",
        MILES_MASTER_PORT="21000",
        MILES_WEIGHT_UPDATE_PORT="21002",
        MASTER_PORT="1",
        MASTER_ADDR="ignored",
    )
    ctx = task_context(env, SPLIT, role="trainer", run_dir="/r")
    assert (ctx.master_addr, ctx.master_port, ctx.weight_update_port) == ("10.0.0.5", 21000, 21002)


def test_torchrun_style_env_of_the_local_launcher() -> None:
    env = {
        "RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29555",
        "MILES_WEIGHT_UPDATE_PORT": "29556",
        "MILES_LAUNCH_ID": "local-abc",
        "MILES_RUN_DIR": "/run",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
    }  # torchrun inside an allocation: RANK wins
    ctx = task_context(env, SPLIT, role="trainer", cuda_available=True)
    assert detect_launcher(env) == "torchrun"
    assert (ctx.rank, ctx.world_size, ctx.master_addr, ctx.master_port) == (1, 4, "127.0.0.1", 29555)
    assert (ctx.device, ctx.backend, ctx.launch_id, str(ctx.run_dir)) == ("cuda", "nccl", "local-abc", "/run")
    assert task_context(env, SPLIT, role="trainer", cuda_available=True, device_pref="cpu").backend == "gloo"


def test_mpi_envs() -> None:
    ompi = {
        "OMPI_COMM_WORLD_RANK": "2",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "0",
        "SLURM_JOB_NODELIST": "node[3-4]",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_ID": "9",
    }
    ctx = task_context(ompi, SPLIT, role="trainer", run_dir="/r")
    assert (ctx.launcher, ctx.rank, ctx.world_size, ctx.master_addr) == ("mpi", 2, 4, "node3")
    assert task_context(ompi, SPLIT, role="trainer", run_dir="/r", rank0_host="node4").master_addr == "node4"
    mpich = {"PMI_RANK": "5", "PMI_SIZE": "6", "MPI_LOCALRANKID": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "23000"}
    ctx = task_context(mpich, SPLIT, run_dir="/r")  # 6 = 2 engines + 4 trainers: engines first
    assert (ctx.role, ctx.rank, ctx.local_rank, ctx.master_addr, ctx.master_port) == ("trainer", 3, 1, "h0", 23000)
    with pytest.raises(UserError, match="MASTER_ADDR"):
        task_context({"PMI_RANK": "0", "PMI_SIZE": "4"}, SPLIT, role="trainer", run_dir="/r")


def test_errors_name_the_fix() -> None:
    with pytest.raises(UserError, match="cannot tell this process's rank"):
        task_context({}, SPLIT, role="trainer", run_dir="/r")
    with pytest.raises(UserError, match="launched 3 trainer ranks but the plan has 4"):
        task_context({"RANK": "0", "WORLD_SIZE": "3"}, SPLIT, role="trainer", run_dir="/r")
    with pytest.raises(UserError, match="pass --role"):
        task_context({"RANK": "0", "WORLD_SIZE": "5"}, SPLIT, run_dir="/r")
    with pytest.raises(UserError, match="no run directory"):
        task_context({"RANK": "0", "WORLD_SIZE": "4"}, SPLIT, role="trainer")
    with pytest.raises(UserError, match="sees no GPU"):
        task_context({"RANK": "0", "WORLD_SIZE": "4"}, SPLIT, role="trainer", run_dir="/r", device_pref="cuda")
    with pytest.raises(UserError, match="plan.json does not look like a miles plan"):
        Layout.from_plan({"mode": "split"})


def test_layout_from_a_real_plan_and_rebased_ports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1=", "label": "2"}\n')
    (tmp_path / "run.toml").write_text(
        '[run]\nnum_rollout = 1\n[model]\nbuiltin = "tiny-arith"\ndtype = "float32"\n'
        '[rollout]\nprompt_data = "p.jsonl"\ninput_key = "prompt"\nrm_type = "exact_match"\nrollout_batch_size = '
        "8\nn_samples_per_prompt = 8\n"
        '[train]\nglobal_batch_size = 64\n[perf]\nbackend = "fsdp"\n'
        '[cluster]\nmode = "split"\ngpus_per_node = 0\nrollout_num_nodes = 1\nrollout_num_gpus = 2\n'
        'actor_num_nodes = 2\nactor_num_gpus_per_node = 2\ndevice = "cpu"\n'
    )
    spec = load_spec("run.toml", [])
    plan = make_plan(spec)
    layout = Layout.from_plan(json.loads(to_json(plan)))
    assert (layout.mode, layout.trainer_world_size, layout.num_engines) == ("split", 4, 2)
    assert (layout.trainer_het_group, layout.engine_het_group) == (1, 0)
    assert layout.engine_rank_offsets == (1, 2)
    # Rebasing the placeholder ports onto job 7 gives exactly what the planner derives for job 7.
    real = make_plan(spec, job_id=7).ports
    moved = layout.for_job(7)
    assert (moved.master_port, moved.weight_update_port) == (real.master, real.weight_update[0])
    assert moved.engine_http_ports == real.engine_http
