"""The rendered sbatch scripts: directives, steps, containers, and the batch shell's behaviour when run."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from miles.plan import PlanError, make_plan, render_script
from miles.spec.tables import Spec
from tests.unit.plan.plan_specs import cpu_spec, spec
from tests.unit.plan.script_harness import run_script


def script_of(s: Spec) -> str:
    return render_script(s, make_plan(s))


def in_run_dir(s: Spec, tmp: Path, **tables: dict) -> Spec:
    import dataclasses

    s = dataclasses.replace(s, run=dataclasses.replace(s.run, run_dir=str(tmp / "run")))
    for table, changes in tables.items():
        s = dataclasses.replace(s, **{table: dataclasses.replace(getattr(s, table), **changes)})
    return s


def directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def test_bash_accepts_every_variant() -> None:
    variants = [
        spec("split"),
        spec("colocate"),
        cpu_spec("colocate"),
        cpu_spec("split"),
        spec(
            slurm={
                "container_runtime": "pyxis",
                "container_image": "nvcr.io#nvidia/pytorch:25.01-py3",
                "container_mounts": ["/a:/b"],
            }
        ),
        spec(
            "colocate",
            slurm={
                "container_runtime": "apptainer",
                "container_image": "/img/m.sif",
                "container_mounts": ["/a:/b:ro"],
                "modules": ["cuda/12.4"],
                "setup": ["ulimit -n 65536"],
                "env": {"NCCL_DEBUG": "WARN"},
            },
        ),
    ]
    for s in variants:
        subprocess.run(["bash", "-n"], input=script_of(s), text=True, check=True)


def test_split_directives() -> None:
    text = script_of(
        spec(
            slurm={
                "partition": "train",
                "rollout_partition": "infer",
                "account": "acc",
                "qos": "q",
                "constraint": "h100&ib",
                "reservation": "r1",
                "time": "1-00:00:00",
            },
            cluster={"cpus_per_node": 64, "mem_per_node": "512G"},
        )
    )
    d = directives(text)
    head = d[: d.index("#SBATCH hetjob")]
    tail = d[d.index("#SBATCH hetjob") + 1 :]
    for line in (
        "--job-name=t",
        "--output=/shared/runs/t/slurm-%j.out",
        "--error=/shared/runs/t/slurm-%j.err",
        "--open-mode=append",
        "--requeue",
        "--signal=B:USR1@120",
        "--time=1-00:00:00",
    ):
        assert f"#SBATCH {line}" in head
    for line in (
        "--nodes=1",
        "--ntasks-per-node=4",
        "--gpus-per-node=8",
        "--cpus-per-task=16",
        "--mem=512G",
        "--partition=infer",
        "--account=acc",
        "--qos=q",
        "--constraint=h100&ib",
        "--reservation=r1",
        "--exclusive",
    ):
        assert f"#SBATCH {line}" in head, line
    for line in ("--nodes=1", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8", "--partition=train"):
        assert f"#SBATCH {line}" in tail, line
    assert d.count("#SBATCH hetjob") == 1
    # directives come before the first command, so sbatch reads them all
    assert text.index("set -euo pipefail") > text.index("#SBATCH --exclusive\n\n")
    assert (
        "srun --het-group=0 --job-name=miles-engines --kill-on-bad-exit=1 --wait=60" in text
        and "srun --het-group=1 --job-name=miles-trainers --kill-on-bad-exit=1 --wait=60" in text
    )
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_1"' in text


def test_optional_directives_only_when_set() -> None:
    d = "\n".join(directives(script_of(spec("colocate", slurm={"exclusive": False}))))
    for flag in (
        "--partition",
        "--account",
        "--qos",
        "--constraint",
        "--reservation",
        "--exclusive",
        "--cpus-per-task",
        "hetjob",
    ):
        assert flag not in d


def test_gres_request_and_cpu_jobs() -> None:
    assert "#SBATCH --gres=gpu:8" in script_of(spec(slurm={"gpu_request": "gres"}))
    cpu = script_of(cpu_spec())
    assert "gpu" not in "\n".join(directives(cpu)) and "--nv" not in cpu


def test_colocate_steps_overlap() -> None:
    text = script_of(spec("colocate"))
    assert (
        "srun --overlap --job-name=miles-engines --kill-on-bad-exit=1 --wait=60" in text and "--het-group" not in text
    )
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in text


def test_directive_filter_refuses_at_render_time() -> None:
    import dataclasses

    s = spec()
    plan = make_plan(s)
    bad = dataclasses.replace(s, slurm=dataclasses.replace(s.slurm, account="x\nrm -rf /"))
    with pytest.raises(PlanError, match="slurm.account"):
        render_script(bad, plan)


def test_finished_run_exits_zero(tmp_path: Path) -> None:
    out = run_script(script_of(in_run_dir(spec(), tmp_path)), tmp_path, trainer="done")
    assert out.rc == 0, out.stderr
    assert "run complete" in out.stdout and out.requeued == []
    assert (tmp_path / "run" / "control").is_dir()


def test_ports_and_rendezvous_agree_with_planner(tmp_path: Path) -> None:
    s = in_run_dir(
        spec(perf={"tp": 2, "pp": 2}, cluster={"actor_num_nodes": 2}, train={"global_batch_size": 64}), tmp_path
    )
    for job_id in (12345, 199, 7):
        out = run_script(script_of(s), tmp_path, job_id=job_id)
        assert out.rc == 0, out.stderr
        plan = make_plan(s, job_id=job_id)
        for role in ("trainer", "engine"):
            env = out.env[role]
            assert int(env["MASTER_PORT"]) == int(env["MILES_MASTER_PORT"]) == plan.ports.master
            assert int(env["MILES_ROUTER_PORT"]) == plan.ports.router
            assert int(env["MILES_WEIGHT_UPDATE_PORT"]) + 1 == plan.ports.weight_update[1]
            assert int(env["MILES_ENGINE_PORT_BASE"]) == plan.ports.engine_http[0]
            assert int(env["MILES_ENGINE_PORT_BASE"]) + 2 == plan.ports.engine_http[1]
            assert env["MILES_JOB_ID"] == str(job_id) and env["MILES_RUN_DIR"] == str(tmp_path / "run")
            assert env["MASTER_ADDR"] == env["MILES_MASTER_ADDR"] == "host-trainernodes-a"


def test_step_command_lines(tmp_path: Path) -> None:
    s = in_run_dir(spec(), tmp_path, slurm={"python": "/opt/py env/bin/python"})
    out = run_script(script_of(s), tmp_path)
    run = str(tmp_path / "run")
    assert out.args["engine"] == [
        "--het-group=0",
        "--job-name=miles-engines",
        "--kill-on-bad-exit=1",
        "--wait=60",
        "--nodes=1",
        "--ntasks-per-node=4",
        "/opt/py env/bin/python",
        "-m",
        "miles.launch.task",
        "--run-dir",
        run,
        "--role",
        "engine",
    ]
    assert out.args["trainer"][:6] == [
        "--het-group=1",
        "--job-name=miles-trainers",
        "--kill-on-bad-exit=1",
        "--wait=60",
        "--nodes=1",
        "--ntasks-per-node=8",
    ]


def test_pyxis_flags(tmp_path: Path) -> None:
    s = in_run_dir(
        spec(),
        tmp_path,
        slurm={
            "container_runtime": "pyxis",
            "container_image": "nvcr.io#nvidia/pytorch:25.01-py3",
            "container_mounts": ["/data:/data:ro", "/my models:/m"],
        },
    )
    out = run_script(script_of(s), tmp_path)
    run = str(tmp_path / "run")
    args = out.args["trainer"]
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" in args
    assert f"--container-mounts={run}:{run},/data:/data:ro,/my models:/m" in args
    assert f"--container-workdir={run}" in args and "--no-container-mount-home" in args


def test_apptainer_prefix(tmp_path: Path) -> None:
    s = in_run_dir(
        spec(),
        tmp_path,
        slurm={
            "container_runtime": "apptainer",
            "container_image": "/img/miles.sif",
            "container_mounts": ["/data:/data"],
        },
    )
    out = run_script(script_of(s), tmp_path)
    run = str(tmp_path / "run")
    args = out.args["engine"]
    i = args.index("apptainer")
    assert args[i : i + 8] == ["apptainer", "exec", "--nv", "--bind", run, "--bind", "/data:/data", "/img/miles.sif"]


def test_preempted_run_requeues_itself(tmp_path: Path) -> None:
    out = run_script(script_of(in_run_dir(spec(), tmp_path)), tmp_path, trainer="ok", restart=1)
    assert out.rc == 0, out.stderr
    assert out.requeued == ["12345"] and "requeueing job 12345 (restart 2 of 3)" in out.stdout


def test_requeue_stops_at_max_requeues(tmp_path: Path) -> None:
    out = run_script(
        script_of(in_run_dir(spec(), tmp_path, slurm={"max_requeues": 2})), tmp_path, trainer="ok", restart=2
    )
    assert out.rc == 3 and out.requeued == []
    assert "slurm.max_requeues = 2" in out.stderr


def test_usr1_asks_ranks_to_checkpoint_then_requeues(tmp_path: Path) -> None:
    out = run_script(
        script_of(in_run_dir(spec("colocate"), tmp_path)),
        tmp_path,
        trainer="wait-preempt",
        signal_after_start=signal.SIGUSR1,
    )
    assert out.rc == 0, out.stderr
    assert "received SIGUSR1" in out.stderr and out.requeued == ["12345"]
    assert (tmp_path / "run" / "control" / "preempt").exists()


def test_stale_preempt_flag_is_cleared_at_start(tmp_path: Path) -> None:
    (tmp_path / "run" / "control").mkdir(parents=True)
    (tmp_path / "run" / "control" / "preempt").touch()
    out = run_script(script_of(in_run_dir(spec(), tmp_path)), tmp_path, trainer="done")
    assert out.rc == 0 and not (tmp_path / "run" / "control" / "preempt").exists()


def test_failed_trainers_fail_the_job(tmp_path: Path) -> None:
    out = run_script(script_of(in_run_dir(spec(), tmp_path)), tmp_path, trainer="fail")
    assert out.rc == 7 and "the trainers step failed (exit 7)" in out.stderr and out.requeued == []
    assert "stopping the engines step" in out.stderr


def test_failed_engines_fail_the_job(tmp_path: Path) -> None:
    out = run_script(script_of(in_run_dir(spec(), tmp_path)), tmp_path, trainer="wait-preempt", engine="fail")
    assert out.rc == 5 and "the engines step ended (exit 5)" in out.stderr
    assert "stopping the trainers step" in out.stderr and out.requeued == []


def test_a_run_directory_held_by_another_run_is_refused_before_any_step(tmp_path: Path) -> None:
    import os
    import sys

    from miles.launch import lock

    run_dir = tmp_path / "run"
    held = lock.acquire(run_dir, "miles run", settle_s=0)
    try:
        out = run_script(script_of(in_run_dir(spec(), tmp_path)), tmp_path, trainer="done")
    finally:
        held.release()
    assert out.rc == 2 and f'"pid": {os.getpid()}' in out.stderr and "two runs must not write" in out.stderr
    assert out.args == {}  # no step started
    # Free, the job takes the lock and names itself; while it runs, `miles run` of the directory is refused.
    out = run_script(script_of(in_run_dir(spec(), tmp_path)), tmp_path, trainer="done")
    assert out.rc == 0, out.stderr
    assert lock.holder(run_dir)["what"] == "Slurm job 12345"
    root = Path(__file__).resolve().parents[3]
    probe = (
        f"import sys; sys.path.insert(0, {str(root)!r}); from pathlib import Path; from miles.launch import lock; "
        "lock.check_free(Path(sys.argv[1]))"
    )
    script = script_of(in_run_dir(spec(), tmp_path)).replace(
        'MILES_CONTROL="$MILES_RUN_DIR/control"\n',
        f'MILES_CONTROL="$MILES_RUN_DIR/control"\n{sys.executable} -c "{probe}" "$MILES_RUN_DIR" || exit 42\n',
        1,
    )
    out = run_script(script, tmp_path, trainer="done")
    assert out.rc == 42 and "is in use by Slurm job 12345" in out.stderr, out.stderr


def test_stale_done_of_an_earlier_job_or_selftest_does_not_end_this_one(tmp_path: Path) -> None:
    control = tmp_path / "run" / "control"
    control.mkdir(parents=True)
    (control / "done").write_text("selftest\n")
    (control / "stop-999").write_text("{}")  # another job's stop request
    out = run_script(
        script_of(in_run_dir(spec("colocate"), tmp_path)),
        tmp_path,
        trainer="wait-preempt",
        signal_after_start=signal.SIGUSR1,
    )
    assert out.rc == 0, out.stderr
    assert "run complete" not in out.stdout and out.requeued == ["12345"] and out.scancelled == []


def test_usr1_with_this_jobs_stop_request_saves_and_cancels_instead_of_requeueing(tmp_path: Path) -> None:
    """`miles cancel`: control/stop-<id>, then USR1; the ranks save and the job cancels itself."""
    (tmp_path / "run" / "control").mkdir(parents=True)
    out = run_script(
        script_of(in_run_dir(spec("colocate"), tmp_path)),
        tmp_path,
        trainer="wait-preempt",
        signal_after_start=signal.SIGUSR1,
        stop_file="stop-12345",
    )
    assert out.rc == 0, out.stderr
    assert out.requeued == [] and out.scancelled == ["12345"], (out.stdout, out.stderr)
    assert "job 12345 was cancelled" in out.stdout
    assert "received SIGUSR1" in out.stderr


def test_a_stop_request_found_at_start_ends_the_job_before_any_step(tmp_path: Path) -> None:
    """A requeue that raced `miles cancel`: the next life of the job ends at once, CANCELLED."""
    control = tmp_path / "run" / "control"
    control.mkdir(parents=True)
    (control / "stop-12345").write_text("{}")
    out = run_script(script_of(in_run_dir(spec(), tmp_path)), tmp_path, trainer="ok", restart=1)
    assert out.rc == 0 and out.args == {} and out.requeued == [] and out.scancelled == ["12345"], out.stderr


def test_trainers_killed_by_a_cancel_do_not_fail_or_requeue_the_job(tmp_path: Path) -> None:
    """`miles cancel --now`: the ranks die of the TERM; the shell reports the cancel, not a failure."""
    control = tmp_path / "run" / "control"
    control.mkdir(parents=True)
    out = run_script(
        script_of(in_run_dir(spec(), tmp_path)), tmp_path, trainer="killed-on-stop", stop_file="stop-12345"
    )
    assert out.rc == 0 and out.requeued == [] and out.scancelled == ["12345"], out.stderr
    assert "trainers step failed" not in out.stderr


def test_a_site_port_range_reaches_the_plan_the_script_and_the_ranks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MILES_PORT_RANGE where miles plans: the script exports it, and its shell arithmetic agrees with the planner."""
    monkeypatch.setenv("MILES_PORT_RANGE", "40000-40639")  # 10 blocks of 64
    s = in_run_dir(spec(), tmp_path)
    text = script_of(s)
    assert "export MILES_PORT_RANGE=40000-40639" in text and "the site's MILES_PORT_RANGE" in text
    for job_id in (12345, 7):
        out = run_script(text, tmp_path, job_id=job_id)
        plan = make_plan(s, job_id=job_id)
        env = out.env["trainer"]
        assert plan.ports.base == 40000 + (job_id % 10) * 64 == int(env["MILES_PORT_BASE"])
        assert int(env["MASTER_PORT"]) == plan.ports.master and env["MILES_PORT_RANGE"] == "40000-40639"


@pytest.mark.parametrize("value", ["40000", "40000-40010", "80-2000", "40000-70000", "a-b"])
def test_a_bad_site_port_range_is_refused_naming_it(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from miles.errors import UserError

    monkeypatch.setenv("MILES_PORT_RANGE", value)
    with pytest.raises(UserError, match=f"MILES_PORT_RANGE='{value}'"):
        make_plan(spec())
