"""Split mode on one node: one plain job with disjoint GPU sets, not a het job of two whole nodes."""

from __future__ import annotations

import json
from pathlib import Path

from miles.plan import make_plan, render_script, summary
from tests.unit.plan.plan_specs import spec


def _four_plus_four():  # type: ignore[no-untyped-def]
    return spec(
        "split",
        cluster={"actor_num_gpus_per_node": 4, "rollout_num_nodes": None, "rollout_num_gpus": 4},
        train={"global_batch_size": 64},
    )


def test_engines_and_trainers_that_fit_one_node_plan_one_component() -> None:
    plan = make_plan(_four_plus_four())
    assert plan.mode == "split"
    (comp,) = plan.components
    assert (comp.role, comp.nodes, comp.gpus_per_node) == ("engines+trainers", 1, 8)
    assert plan.trainer_het_group == plan.engine_het_group == 0
    engine_gpus = {g for e in plan.engines for g in e.gpus}
    trainer_gpus = {r.gpu for r in plan.trainer_ranks}
    assert engine_gpus == {0, 1, 2, 3} and trainer_gpus == {4, 5, 6, 7}
    assert not any("heterogeneous" in w for w in plan.warnings)
    assert "one node" in summary(_four_plus_four(), plan)


def test_the_script_is_one_job_with_cuda_visible_devices_per_step() -> None:
    s = _four_plus_four()
    text = render_script(s, make_plan(s))
    srun_lines = [line for line in text.splitlines() if line.startswith("srun ")]
    assert "#SBATCH hetjob" not in text and len(srun_lines) == 2
    assert not any("--het-group" in line for line in srun_lines)
    assert "#SBATCH --nodes=1" in text and "#SBATCH --gpus-per-node=8" in text
    assert 'env CUDA_VISIBLE_DEVICES=0,1,2,3 "${MILES_TASK[@]}" --role engine' in text
    assert 'env CUDA_VISIBLE_DEVICES=4,5,6,7 "${MILES_TASK[@]}" --role trainer' in text
    assert "--ntasks-per-node=2" in text  # two engines of TP 2


def test_split_that_does_not_fit_one_node_stays_a_het_job() -> None:
    plan = make_plan(spec("split"))  # 8 trainer GPUs + a whole engine node
    assert [c.role for c in plan.components] == ["engines", "trainers"]
    assert "#SBATCH hetjob" in render_script(spec("split"), plan)


def test_a_mapped_architecture_passes(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"model_type": "qwen3", "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8}
        )
    )
    make_plan(spec("split", model={"hf_checkpoint": str(tmp_path)}))


def test_the_one_node_script_runs_both_steps_on_their_own_gpus(tmp_path: Path) -> None:
    from tests.unit.plan.script_harness import run_script
    from tests.unit.plan.test_script import in_run_dir, script_of

    s = in_run_dir(_four_plus_four(), tmp_path)
    out = run_script(script_of(s), tmp_path, trainer="done")
    assert out.rc == 0, out.stderr
    engine, trainer = out.args["engine"], out.args["trainer"]
    assert engine[:2] == ["--overlap", "--job-name=miles-engines"]
    assert engine[engine.index("env") + 1] == "CUDA_VISIBLE_DEVICES=0,1,2,3"
    assert trainer[trainer.index("env") + 1] == "CUDA_VISIBLE_DEVICES=4,5,6,7"
    assert "--ntasks-per-node=4" in trainer and "--ntasks-per-node=2" in engine
    assert out.env["trainer"]["MILES_MASTER_ADDR"] == "host-nodes[1-2]-a"  # the job's own node list, no het group
