"""The rendered scripts on a real (local) Slurm cluster: het job, steps, rendezvous, USR1 -> save -> requeue -> resume.

The ranks are stood in for by a small shell program (``slurm.python`` points
to it) that records each task's environment and plays the trainer/engine
protocol: engines serve until stopped; trainers wait for control/preempt on
the first attempt and write control/done on the restart. Everything else is
the real script under real sbatch/srun/scontrol.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from miles.plan import make_plan, render_script
from tests.integration.conftest import slurm_cluster  # noqa: F401  (the session fixture)
from tests.unit.plan.plan_specs import spec

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

FAKE_RANK = r"""#!/bin/bash
role=""; prev=""
for a in "$@"; do [ "$prev" = "--role" ] && role=$a; prev=$a; done
env | grep -E '^(MILES_|MASTER_|SLURM_PROCID=|SLURMD_NODENAME=)' | sort \
  > "$MILES_RUN_DIR/env-$role-$SLURM_PROCID-r$MILES_RESTART_COUNT"
if [ "$role" = engine ]; then trap 'exit 0' TERM; while :; do sleep 0.2; done; fi
if [ "$MILES_RESTART_COUNT" = 0 ]; then
  for i in $(seq 450); do [ -e "$MILES_RUN_DIR/control/preempt" ] && exit 0; sleep 0.2; done
  exit 9
fi
[ "$SLURM_PROCID" = 0 ] && touch "$MILES_RUN_DIR/control/done"
exit 0
"""


def _sacct_states(job_id: str) -> set[str]:
    res = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True, timeout=20
    )
    return {s.split(" ")[0] for s in res.stdout.split()}


def _env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


@pytest.mark.parametrize("mode", ["split", "colocate"])
def test_preempt_requeue_resume_on_slurm(mode: str, tmp_path: Path, slurm_cluster: dict[str, str]) -> None:  # noqa: F811
    fake = tmp_path / "fake-rank"
    fake.write_text(FAKE_RANK)
    fake.chmod(0o755)
    run_dir = tmp_path / "run"
    s = spec(
        mode,
        run={"name": f"plan-{mode}", "run_dir": str(run_dir)},
        cluster={
            "gpus_per_node": 2,
            "actor_num_gpus_per_node": 2,
            "rollout_num_nodes": None,
            "rollout_num_gpus": 2 if mode == "split" else None,
            "mem_per_node": "500M",
            "cpus_per_node": 2,
        },
        sglang={"rollout_num_gpus_per_engine": 1},
        perf={"tp": 1, "sequence_parallel": False},
        train={"global_batch_size": 64},
        slurm={"python": str(fake), "exclusive": False, "time": "00:05:00", "max_requeues": 1},
    )
    script = render_script(s, make_plan(s))
    run_dir.mkdir()
    (tmp_path / "job.sbatch").write_text(script)
    job_id = (
        subprocess.run(
            ["sbatch", "--parsable", str(tmp_path / "job.sbatch")],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            cwd=tmp_path,
        )
        .stdout.strip()
        .split(";")[0]
    )
    try:
        deadline = time.monotonic() + 90
        while len(list(run_dir.glob("env-*-r0"))) < 4:  # 2 engines + 2 trainers running
            assert time.monotonic() < deadline, f"job {job_id} did not start its steps: {_sacct_states(job_id)}"
            time.sleep(0.5)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=20)
        poked = False
        while not (run_dir / "control" / "done").exists() or _sacct_states(job_id) != {"COMPLETED"}:
            assert time.monotonic() < deadline + 90, f"job {job_id}: {_sacct_states(job_id)}\n" + "\n".join(
                p.read_text() for p in run_dir.glob("slurm-*")
            )
            if not poked and _sacct_states(job_id) == {"PENDING"}:
                # The local cluster starts a requeued het job only at its next backfill pass; nudge
                # its scheduler (test-only; never in miles) a couple of seconds after the requeue.
                time.sleep(2)
                subprocess.run(
                    ["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True, timeout=20
                )
                poked = True
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job_id], timeout=20)
    out = (run_dir / f"slurm-{job_id}.out").read_text()
    err = (run_dir / f"slurm-{job_id}.err").read_text()
    assert "received SIGUSR1" in err and f"requeueing job {job_id} (restart 1 of 1)" in out and "run complete" in out
    plan = make_plan(s, job_id=int(job_id))
    envs = {p.name: _env(p) for p in run_dir.glob("env-*")}
    assert {n.rsplit("-", 1)[1] for n in envs} == {"r0", "r1"}
    trainer_host = _env(run_dir / "env-trainer-0-r0")["SLURMD_NODENAME"]
    for env in envs.values():
        assert int(env["MASTER_PORT"]) == int(env["MILES_MASTER_PORT"]) == plan.ports.master
        assert int(env["MILES_WEIGHT_UPDATE_PORT"]) == plan.weight_update_groups[0].port
        assert int(env["MILES_ENGINE_PORT_BASE"]) == plan.ports.engine_http[0]
        assert env["MILES_JOB_ID"] == job_id and env["MASTER_ADDR"] == trainer_host
