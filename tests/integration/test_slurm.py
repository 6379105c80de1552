"""``miles submit`` against a real Slurm 22.05 cluster (slurm/local-cluster.sh: 4 nodes x 4 fake GPUs).

The jobs run ``miles.launch.task --selftest`` (MILES_SELFTEST=1 travels with
sbatch's exported environment): trainer ranks all-reduce, engines serve HTTP
and announce themselves, the driver reaches them and broadcasts over the
weight-update group; each rank reports what it saw, which is checked here, by
value, against the plan. Every wait is bounded and polls every 0.3 s.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from miles.errors import UserError
from miles.job.nodelist import expand_nodelist
from miles.launch import lifecycle, submission
from miles.launch.selftest import expected_broadcast
from miles.plan import make_plan
from miles.spec import load_spec

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.3


def write_prompts(path: Path) -> Path:
    """A tiny prompt set in the tiny-arith alphabet: "12+34=" -> last digit of the sum."""
    rows = [
        {"prompt": f"{a:02d}+{b:02d}=", "label": str((a + b) % 10)} for a in range(0, 40, 5) for b in range(3, 40, 7)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _spec_text(name: str, mode: str, cluster: str, slurm: str = "") -> str:
    return f"""
[run]
name = "{name}"
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
mode = "{mode}"
gpus_per_node = 4
{cluster}
[slurm]
time = "00:05:00"
python = "{sys.executable}"
{slurm}
"""


COLOCATE = "actor_num_nodes = 2\nactor_num_gpus_per_node = 1"
SPLIT = "rollout_num_nodes = 1\nrollout_num_gpus = 1\nactor_num_nodes = 2\nactor_num_gpus_per_node = 1"


def _spec(tmp: Path, name: str, mode: str, cluster: str, slurm: str = "", overrides: list[str] | None = None):
    write_prompts(tmp / "prompts.jsonl")  # beside the spec: relative input paths resolve from its directory
    path = tmp / f"{name}.toml"
    path.write_text(_spec_text(name, mode, cluster, slurm))
    return load_spec(str(path), overrides or [])


def _submit(tmp: Path, spec) -> tuple[str, Path]:
    assert submission.submit(spec) == 0
    run_dir = tmp / "runs" / spec.run.name
    return json.loads((run_dir / "job.json").read_text())["job_id"], run_dir


def _wait_gone(job_id: str, timeout: float) -> float:
    """Seconds until the job left squeue; fails the test after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and not out.stdout.strip():
            return time.monotonic() - t0
        time.sleep(POLL_S)
    subprocess.run(["scancel", job_id], timeout=20)
    pytest.fail(f"job {job_id} still in squeue after {timeout} s")


def _final_states(job_id: str, timeout: float = 20, components: int = 1) -> dict[str, str]:
    """Component -> state from sacct, once accounting has every component in a final state.

    A het job's component records (``N+0``, ``N+1``) can reach accounting a moment after
    a plain ``N`` record does, so the wait also covers the expected number of components.
    """
    end = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < end:
        states = {k: v["State"] for k, v in submission.job_states(job_id).items()}
        if len(states) >= components and all(
            s not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED") for s in states.values()
        ):
            return states
        time.sleep(POLL_S)
    pytest.fail(f"sacct never showed job {job_id} finished: {states}")


def _logs(run_dir: Path, job_id: str) -> str:
    return "".join(
        (run_dir / f"slurm-{job_id}.{ext}").read_text()
        for ext in ("out", "err")
        if (run_dir / f"slurm-{job_id}.{ext}").exists()
    )


def _reports(run_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (run_dir / "selftest").glob("*.json")}


def _check_against_plan(spec, run_dir: Path, job_id: str) -> None:
    """Every rank's context and Slurm environment agree with the plan of this job id."""
    plan = make_plan(spec, job_id=int(job_id))
    reports = _reports(run_dir)
    world = plan.mesh.world_size
    assert sorted(reports) == sorted(
        [f"trainer-{r}" for r in range(world)] + [f"engine-{i}" for i in range(len(plan.engines))]
    ), sorted(reports)
    trainer_nodes = reports["trainer-0"]["env"]["SLURM_STEP_NODELIST"]
    for r in plan.trainer_ranks:
        rep = reports[f"trainer-{r.rank}"]
        ctx, env = rep["context"], rep["env"]
        assert rep["phase"] == "done" and rep["all_reduce"] == world * (world + 1) / 2
        assert (ctx["rank"], ctx["world_size"], ctx["local_rank"]) == (r.rank, world, r.local_rank)
        assert (int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])) == (r.rank, world)
        assert int(env["SLURM_NODEID"]) == ctx["node_index"] == r.node
        assert ctx["node_name"] == expand_nodelist(trainer_nodes)[r.node]
        assert ctx["master_addr"] == expand_nodelist(trainer_nodes)[0]
        assert (ctx["master_port"], ctx["weight_update_port"]) == (plan.ports.master, plan.ports.weight_update[0])
        assert ctx["het_group"] == (plan.trainer_het_group if plan.mode == "split" else None)
        assert ctx["launch_id"] == f"slurm-{job_id}.0" and ctx["backend"] == "gloo"
    driver = reports["trainer-0"]
    assert driver["engines_ok"] == len(plan.engines)
    assert driver["broadcast"] == expected_broadcast(f"slurm-{job_id}.0")
    for e in plan.engines:
        rep = reports[f"engine-{e.index}"]
        ctx = rep["context"]
        assert rep["broadcast"] == expected_broadcast(f"slurm-{job_id}.0")
        assert (ctx["engine_index"], ctx["weight_update_rank"]) == (e.index, e.ranks[0])
        assert ctx["het_group"] == (plan.engine_het_group if plan.mode == "split" else None)
        assert ctx["master_addr"] == expand_nodelist(trainer_nodes)[0]  # engines find trainer rank 0 too
        assert rep["url"] in driver["engine_urls"]


@pytest.fixture()
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MILES_SELFTEST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


def test_colocated_job_completes_with_checked_values(in_tmp: Path) -> None:
    spec = _spec(in_tmp, "colo", "colocate", COLOCATE)
    job_id, run_dir = _submit(in_tmp, spec)
    assert {"spec.toml", "plan.json", "job.sbatch", "job.json"} <= {p.name for p in run_dir.iterdir()}
    _wait_gone(job_id, 120)
    assert _final_states(job_id) == {job_id: "COMPLETED"}, _logs(run_dir, job_id)
    _check_against_plan(spec, run_dir, job_id)
    assert "miles: run complete" in _logs(run_dir, job_id)


def test_self_test_under_sbatch_export_none(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A site with SBATCH_EXPORT=NONE: nothing of the submitter's environment reaches the job, so the self-test
    is asked for through slurm.env (docs/admin.md), and the steps still get what the script exports."""
    monkeypatch.setenv("SBATCH_EXPORT", "NONE")
    monkeypatch.delenv("MILES_SELFTEST")
    spec = _spec(
        in_tmp,
        "noexport",
        "colocate",
        "actor_num_nodes = 1\nactor_num_gpus_per_node = 1",
        overrides=["slurm.env.MILES_SELFTEST=1", "slurm.env.OMP_NUM_THREADS=1"],
    )
    job_id, run_dir = _submit(in_tmp, spec)
    _wait_gone(job_id, 120)
    assert _final_states(job_id) == {job_id: "COMPLETED"}, _logs(run_dir, job_id)
    assert "selftest passed" in _logs(run_dir, job_id)
    capsys.readouterr()
    lifecycle.status(str(run_dir))
    assert "state: complete: the self-test passed" in capsys.readouterr().out


def test_a_failure_at_start_is_shown_by_status(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A `slurm.python` that does not exist: the reason is in slurm-<id>.err, and `miles status` prints it."""
    spec = _spec(
        in_tmp,
        "nopython",
        "colocate",
        "actor_num_nodes = 1\nactor_num_gpus_per_node = 1",
        overrides=['slurm.python="/nonexistent/bin/python"'],
    )
    job_id, run_dir = _submit(in_tmp, spec)
    _wait_gone(job_id, 60)
    assert _final_states(job_id) == {job_id: "FAILED"}, _logs(run_dir, job_id)
    capsys.readouterr()
    lifecycle.status(str(run_dir))
    out = capsys.readouterr().out
    assert "state: failed" in out and f"head of {run_dir.resolve() / f'slurm-{job_id}.err'}" in out, out
    assert "/nonexistent/bin/python" in out and "No such file or directory" in out, out


def test_split_het_job_completes_with_checked_values(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _spec(in_tmp, "split", "split", SPLIT)
    job_id, run_dir = _submit(in_tmp, spec)
    _wait_gone(job_id, 120)
    assert _final_states(job_id, components=2) == {f"{job_id}+0": "COMPLETED", f"{job_id}+1": "COMPLETED"}, _logs(
        run_dir, job_id
    )
    _check_against_plan(spec, run_dir, job_id)
    # the engines (het group 0) and the trainers (het group 1) ran on different nodes
    reports = _reports(run_dir)
    engine_nodes = {reports["engine-0"]["context"]["node_name"]}
    trainer_nodes = {reports[f"trainer-{r}"]["context"]["node_name"] for r in range(2)}
    assert len(trainer_nodes) == 2 and not engine_nodes & trainer_nodes
    capsys.readouterr()
    assert lifecycle.status(str(run_dir)) == 0
    out = capsys.readouterr().out
    assert f"{job_id}+0: COMPLETED" in out and f"{job_id}+1: COMPLETED" in out
    assert "state: complete: the self-test passed" in out


@pytest.mark.parametrize(
    ("victim", "step_message"),
    [
        ("trainer-1", "the trainers step failed"),
        ("engine-0", "the engines step ended"),
    ],
    ids=["trainer", "engine"],
)
def test_killed_task_fails_the_job_within_60s_naming_it(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, victim: str, step_message: str
) -> None:
    monkeypatch.setenv("MILES_SELFTEST_HOLD", "300")
    spec = _spec(in_tmp, "kill", "split", SPLIT)
    job_id, run_dir = _submit(in_tmp, spec)
    report = run_dir / "selftest" / f"{victim}.json"
    end = time.monotonic() + 120
    while not report.exists():
        assert time.monotonic() < end, f"{victim} never reported:\n{_logs(run_dir, job_id)}"
        time.sleep(POLL_S)
    rep = json.loads(report.read_text())
    node, task = rep["context"]["node_name"], rep["env"]["SLURM_PROCID"]
    os.kill(rep["pid"], signal.SIGKILL)
    took = _wait_gone(job_id, 90)
    assert took < 60, f"the job took {took:.1f} s to end after {victim} was killed"
    states = _final_states(job_id)
    assert "COMPLETED" not in states.values(), states
    logs = _logs(run_dir, job_id)
    assert re.search(rf"{node}: task {task}: Killed", logs), logs
    assert step_message in logs, logs


def _queue() -> str:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=20).stdout


@pytest.mark.parametrize(
    ("cluster", "overrides", "needle"),
    [
        (
            "actor_num_nodes = 5\nactor_num_gpus_per_node = 1",
            ["rollout.rollout_batch_size=5", "train.global_batch_size=10"],
            "needs 5 nodes but partition 'debug' (4 nodes",
        ),
        (
            "actor_num_nodes = 1\nactor_num_gpus_per_node = 6",
            ["cluster.gpus_per_node=8", "rollout.rollout_batch_size=6", "train.global_batch_size=12"],
            "needs 6 GPUs per node",
        ),
    ],
    ids=["5-nodes", "6-gpus-per-node"],
)
def test_too_big_is_refused_before_submission(in_tmp: Path, cluster: str, overrides: list[str], needle: str) -> None:
    spec = _spec(in_tmp, "big", "colocate", cluster, overrides=overrides)
    before = _queue()
    with pytest.raises(UserError, match=re.escape(needle)):
        submission.submit(spec)
    assert _queue() == before
    assert not (in_tmp / "runs").exists()


def test_test_only_asks_slurm_and_writes_nothing(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _spec(in_tmp, "probe", "split", SPLIT)
    assert submission.submit(spec, test_only=True) == 0
    assert "to start at" in capsys.readouterr().out
    assert not (in_tmp / "runs").exists()


def test_cluster_down_is_a_clear_error_and_leaves_nothing(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = Path(os.environ["SLURM_CONF"]).read_text()
    down = in_tmp / "down.conf"  # the same cluster, but its controller's port answers nothing
    down.write_text(re.sub(r"(?m)^SlurmctldPort=\d+", "SlurmctldPort=16999", conf))
    monkeypatch.setenv("SLURM_CONF", str(down))
    spec = _spec(in_tmp, "down", "colocate", COLOCATE)
    t0 = time.monotonic()
    with pytest.raises(UserError, match="controller is down or unreachable"):
        submission.submit(spec)
    assert time.monotonic() - t0 < 15
    assert not (in_tmp / "runs").exists()
    # the CLI turns it into exit code 2 with the message, no traceback
    path = in_tmp / "down.toml"
    res = subprocess.run(
        [sys.executable, "-m", "miles.cli", "submit", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )
    assert res.returncode == 2 and "controller is down" in res.stderr and "Traceback" not in res.stderr
    assert not (in_tmp / "runs").exists()


def test_sbatch_refusal_removes_the_new_run_dir_and_restores_an_old_one(in_tmp: Path) -> None:
    bad = _spec(in_tmp, "refused", "colocate", COLOCATE, slurm='constraint = "nosuchfeature"')
    with pytest.raises(UserError, match="sbatch"):
        submission.submit(bad)
    assert not (in_tmp / "runs").exists() and not list(in_tmp.glob("runs/.*"))
    # a resubmission into an existing run directory gets its previous files back
    run_dir = in_tmp / "runs" / "refused"
    run_dir.mkdir(parents=True)
    (run_dir / "spec.toml").write_text("# the previous spec\n")
    (run_dir / "job.json").write_text(json.dumps({"job_id": "999999", "history": []}))
    with pytest.raises(UserError, match="sbatch"):
        submission.submit(bad)
    assert (run_dir / "spec.toml").read_text() == "# the previous spec\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["control", "job.json", "logs", "spec.toml"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "cluster"),
    [
        ("colocate", "actor_num_nodes = 1\nactor_num_gpus_per_node = 1"),
        ("split", SPLIT),
    ],
    ids=["colocate", "split"],
)
def test_grpo_loop_completes_on_the_cluster(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, mode: str, cluster: str
) -> None:
    """The real launch path: engines serve the embedded engine, the driver reaches them, two GRPO rollouts run."""
    monkeypatch.delenv("MILES_SELFTEST")
    spec = _spec(
        in_tmp,
        f"loop-{mode}",
        mode,
        cluster,
        overrides=[
            "run.num_rollout=2",
            "run.plot=false",
            "run.use_tensorboard=false",
            "rollout.rollout_max_response_len=1",
        ],
    )
    job_id, run_dir = _submit(in_tmp, spec)
    _wait_gone(job_id, 240)
    states = _final_states(job_id)
    assert set(states.values()) == {"COMPLETED"}, _logs(run_dir, job_id)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout_id"] for r in rows] == [0, 1]
    assert all(r["rollout/samples"] == 8 for r in rows)
    assert (run_dir / "control" / "done").exists() and any((run_dir / "checkpoints").iterdir())
    logs = _logs(run_dir, job_id)
    assert "miles: run complete" in logs and "healthy at http://node" in logs


def test_local_cluster_script_start_is_idempotent_and_status_answers() -> None:
    script = ROOT / "slurm" / "local-cluster.sh"
    t0 = time.monotonic()
    res = subprocess.run([str(script), "start"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "already up" in res.stderr, res.stderr
    assert time.monotonic() - t0 < 10
    res = subprocess.run([str(script), "status"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "slurmctld" in res.stdout and "node4" in res.stdout
    env = subprocess.run([str(script), "env"], capture_output=True, text=True, timeout=10).stdout.strip()
    assert env == f"export SLURM_CONF={os.environ['SLURM_CONF']}"
