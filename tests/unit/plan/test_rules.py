"""One test per planner rule: the spec is refused, and the message names the field and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miles.errors import UserError
from miles.plan import PlanError, make_plan, render_script
from miles.plan.rules import directive_problem
from miles.spec.rules import slurm_time_seconds
from miles.spec.tables import Spec
from tests.unit.plan.plan_specs import cpu_spec, spec


def refused(s: Spec, *needles: str) -> str:
    with pytest.raises(PlanError) as info:
        make_plan(s)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in:\n{msg}"
    assert "Fix:" in msg
    return msg


def test_plan_error_is_a_user_error() -> None:
    assert issubclass(PlanError, UserError)


def test_baselines_are_valid() -> None:
    for s in (spec("split"), spec("colocate"), cpu_spec("colocate"), cpu_spec("split")):
        make_plan(s)


def test_tp_pp_cp_must_divide_trainer_gpus() -> None:
    refused(
        spec(perf={"tp": 2, "pp": 3}),
        "perf.tp x perf.pp x perf.cp = 2 x 3 x 1 = 6",
        "8 trainer GPUs",
        "make the trainer GPUs a multiple of 6",
    )


def test_ep_must_divide_experts() -> None:
    refused(
        spec(model={"num_experts": 60}, perf={"tp": 1, "ep": 8, "sequence_parallel": False}),
        "perf.ep = 8 does not divide model.num_experts = 60",
        "divisors of 60",
    )


def test_ep_needs_an_moe_model() -> None:
    refused(spec(perf={"tp": 1, "ep": 2, "sequence_parallel": False}), "perf.ep = 2", "no experts", "set perf.ep = 1")


def test_etp_times_ep_must_divide_tp_cp_dp() -> None:
    # 8 GPUs, TP2 -> DP4: TP*CP*DP = 8; ETP2 x EP8 = 16 does not divide 8 (Megatron's expert mesh rule).
    refused(
        spec(model={"num_experts": 64}, perf={"tp": 2, "ep": 8}),
        "perf.etp x perf.ep = 2 x 8 = 16 does not divide perf.tp x perf.cp x DP",
        "choose perf.ep",
    )


def test_etp_one_makes_room_for_ep() -> None:
    plan = make_plan(spec(model={"num_experts": 64}, perf={"tp": 2, "ep": 8, "etp": 1}))
    assert (plan.mesh.etp, plan.mesh.ep, plan.mesh.expert_dp) == (1, 8, 1)


def test_moe_with_tp_needs_sequence_parallel() -> None:
    refused(
        spec(model={"num_experts": 64}, perf={"tp": 2, "ep": 2, "sequence_parallel": False}),
        "needs sequence parallelism",
        "perf.sequence_parallel = true",
    )


def test_attention_heads_divisible_by_tp() -> None:
    refused(
        spec(
            model={"num_attention_heads": 12, "num_key_value_heads": 2},
            perf={"tp": 8},
            sglang={"rollout_num_gpus_per_engine": 1},
        ),
        "model.num_attention_heads = 12",
        "perf.tp = 8",
        "divisors of 12",
    )


def test_kv_heads_divisible_by_tp() -> None:
    refused(spec(model={"num_key_value_heads": 2}, perf={"tp": 4}), "model.num_key_value_heads = 2", "perf.tp = 4")


def test_heads_divisible_by_engine_tp() -> None:
    refused(
        spec(
            model={"num_attention_heads": 12, "num_key_value_heads": 12},
            sglang={"rollout_num_gpus_per_engine": 8},
            perf={"tp": 1, "sequence_parallel": False},
        ),
        "model.num_attention_heads = 12",
        "sglang.rollout_num_gpus_per_engine = 8",
    )


def test_kv_heads_and_engine_tp_must_nest() -> None:
    refused(
        spec(
            model={"num_attention_heads": 24, "num_key_value_heads": 6},
            perf={"tp": 2},
            sglang={"rollout_num_gpus_per_engine": 4},
        ),
        "model.num_key_value_heads = 6",
        "sglang.rollout_num_gpus_per_engine = 4",
        "choose an engine TP",
    )


def test_unknown_shape_is_reported_unchecked() -> None:
    plan = make_plan(
        spec(
            model={"num_layers": None, "num_attention_heads": None, "num_key_value_heads": None, "num_experts": None},
            perf={"pp": 2, "tp": 2},
        )
    )
    text = "\n".join(plan.unchecked)
    assert "model.num_attention_heads" in text and "model.num_layers" in text


def test_shape_read_from_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2})
    )
    s = spec(
        model={
            "hf_checkpoint": str(tmp_path),
            "num_layers": None,
            "num_attention_heads": None,
            "num_key_value_heads": None,
            "num_experts": None,
        },
        perf={"tp": 4},
    )
    refused(s, "model.num_key_value_heads = 2", "config.json at")


def test_experts_read_from_config_json_spellings(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8}
        )
    )
    s = spec(
        model={
            "hf_checkpoint": str(tmp_path),
            "num_layers": None,
            "num_attention_heads": None,
            "num_key_value_heads": None,
            "num_experts": None,
        },
        perf={"tp": 1, "ep": 16, "sequence_parallel": False},
    )
    refused(s, "perf.ep = 16 does not divide model.num_experts = 8")


def test_engine_tp_must_divide_rollout_gpus() -> None:
    refused(
        spec(cluster={"rollout_num_nodes": None, "rollout_num_gpus": 6}, sglang={"rollout_num_gpus_per_engine": 4}),
        "sglang.rollout_num_gpus_per_engine = 4",
        "divide",
    )


def test_engine_must_fit_a_node() -> None:
    refused(
        spec(sglang={"rollout_num_gpus_per_engine": 16}, model={"num_attention_heads": 32, "num_key_value_heads": 16}),
        "sglang.rollout_num_gpus_per_engine = 16 exceeds cluster.gpus_per_node = 8",
        "rollout_num_gpus_per_engine <= 8",
    )


def test_engine_must_not_straddle_nodes() -> None:
    refused(
        spec(
            cluster={"gpus_per_node": 6, "actor_num_gpus_per_node": 6, "rollout_num_nodes": 2},
            perf={"tp": 2},
            sglang={"rollout_num_gpus_per_engine": 4},
        ),
        "does not divide the 6 engine GPUs per node",
        "straddle",
    )


def test_colocated_engine_must_not_straddle_nodes() -> None:
    refused(
        spec(
            "colocate",
            cluster={"actor_num_gpus_per_node": 6, "actor_num_nodes": 2},
            perf={"tp": 2},
            train={"global_batch_size": 60},
            sglang={"rollout_num_gpus_per_engine": 4},
        ),
        "does not divide cluster.actor_num_gpus_per_node = 6",
    )


def test_actor_gpus_per_node_fit_the_node() -> None:
    refused(
        spec(cluster={"actor_num_gpus_per_node": 16}),
        "cluster.actor_num_gpus_per_node = 16 exceeds cluster.gpus_per_node = 8",
    )


def test_rollout_gpus_must_fill_whole_nodes() -> None:
    refused(
        spec(cluster={"rollout_num_nodes": None, "rollout_num_gpus": 12}),
        "cluster.rollout_num_gpus = 12",
        "multiple of 8",
    )


def test_rollout_gpus_must_fit_rollout_nodes() -> None:
    refused(
        spec(cluster={"rollout_num_nodes": 1, "rollout_num_gpus": 16}),
        "does not fit cluster.rollout_num_nodes = 1",
        "raise rollout_num_nodes to 2",
    )


def test_rollout_gpus_spread_over_nodes() -> None:
    refused(
        spec(cluster={"rollout_num_nodes": 2, "rollout_num_gpus": 9}, sglang={"rollout_num_gpus_per_engine": 1}),
        "does not spread evenly over cluster.rollout_num_nodes = 2",
    )


def test_layers_not_divisible_by_pp_are_refused() -> None:
    """miles splits the layers evenly over the pipeline stages: an uneven split would fail in the actor."""
    refused(
        spec(model={"num_layers": 35}, perf={"tp": 2, "pp": 2}, train={"global_batch_size": 32}),
        "perf.pp = 2 does not divide model.num_layers = 35",
    )


def test_pp_beyond_layers() -> None:
    refused(
        spec(
            model={"num_layers": 2},
            perf={"tp": 1, "pp": 4, "sequence_parallel": False},
            train={"global_batch_size": 32},
        ),
        "perf.pp = 4 exceeds model.num_layers = 2",
    )


def test_global_batch_divisible_by_dp() -> None:
    refused(spec(train={"global_batch_size": 66}), "train.global_batch_size = 66", "DP = 4", "multiple of 4")


def test_global_batch_divisible_by_dp_times_micro_batch() -> None:
    refused(
        spec(train={"global_batch_size": 64, "micro_batch_size": 32}),
        "DP x train.micro_batch_size = 4 x 32 = 128",
        "train.use_dynamic_batch_size = true",
    )


def test_dynamic_batch_skips_micro_batch_rule() -> None:
    make_plan(
        spec(
            train={
                "global_batch_size": 64,
                "micro_batch_size": 32,
                "use_dynamic_batch_size": True,
                "max_tokens_per_gpu": 4096,
            }
        )
    )


def test_colocate_rollout_gpus_equal_trainer_gpus() -> None:
    refused(
        spec("colocate", cluster={"rollout_num_gpus": 16}),
        "cluster.rollout_num_gpus = 16",
        "8 trainer GPUs",
        "set it to 8",
    )


def test_colocate_rejects_rollout_nodes() -> None:
    refused(spec("colocate", cluster={"rollout_num_nodes": 1}), "cluster.rollout_num_nodes", 'cluster.mode = "split"')


def test_split_needs_rollout_size() -> None:
    refused(spec(cluster={"rollout_num_nodes": None}), "cluster.rollout_num_nodes", "cluster.rollout_num_gpus")


def test_cpu_nodes_cannot_run_sglang() -> None:
    refused(
        cpu_spec(rollout={"engine": "sglang"}), 'rollout.engine = "sglang"', "cluster.gpus_per_node = 0", '"embedded"'
    )


def test_cpu_nodes_reject_cuda_device() -> None:
    refused(cpu_spec(cluster={"device": "cuda"}), 'cluster.device = "cuda"', 'cluster.device = "cpu"')


def test_cpu_engines_are_one_slot() -> None:
    refused(
        cpu_spec(sglang={"rollout_num_gpus_per_engine": 2}),
        "one process (one slot)",
        "sglang.rollout_num_gpus_per_engine = 1",
    )


def test_sglang_on_cpu_device() -> None:
    refused(spec(cluster={"device": "cpu"}), 'cluster.device = "cpu"', 'rollout.engine = "embedded"')


def test_cpu_split_slots_spread_over_nodes() -> None:
    refused(
        cpu_spec("split", cluster={"rollout_num_gpus": 3, "rollout_num_nodes": 2}),
        "do not spread evenly",
        "multiple of 2",
    )


def test_cpus_per_node_cover_the_tasks() -> None:
    refused(
        spec(cluster={"cpus_per_node": 4}), "cluster.cpus_per_node = 4 is fewer than the 8 tasks per node", "at least 8"
    )


def test_port_block_fits() -> None:
    refused(
        cpu_spec(cluster={"actor_num_gpus_per_node": 40}, train={"global_batch_size": 40}), "ports per job", "perf.pp"
    )


@pytest.mark.parametrize(
    ("field", "table", "key"),
    [
        ("run.name", "run", "name"),
        ("run.run_dir", "run", "run_dir"),
        ("slurm.partition", "slurm", "partition"),
        ("slurm.rollout_partition", "slurm", "rollout_partition"),
        ("slurm.account", "slurm", "account"),
        ("slurm.qos", "slurm", "qos"),
        ("slurm.reservation", "slurm", "reservation"),
        ("slurm.constraint", "slurm", "constraint"),
    ],
)
@pytest.mark.parametrize("bad", ["a b", "x\n#SBATCH --uid=0", "$(touch /tmp/p)", "a'b", "a#b"])
def test_directive_values_are_refused_not_quoted(field: str, table: str, key: str, bad: str) -> None:
    refused(spec("split", **{table: {key: bad}}), field, "#SBATCH line", f"change {field}")


def test_slurm_time_format() -> None:
    refused(spec(slurm={"time": "4 hours"}), "slurm.time", "not a Slurm time")


@pytest.mark.parametrize(
    "value",
    [
        "30",
        "30:00",
        "04:00:00",
        "1-00",
        "1-00:00",
        "1-00:00:00",
        "INFINITE",
        "UNLIMITED",
        "infinite",
        "Unlimited",
        "4 hours",
        "",
        "1:2:3:4",
        "-1",
        "1-",
        "04:00:00\n",
        "INFINITE!",
    ],
)
def test_slurm_time_rule_is_the_spec_s(value: str) -> None:
    # The planner's #SBATCH --time check accepts exactly what the spec's field rule accepts: one statement of the
    # syntax (miles.spec.rules.slurm_time_seconds), so a spec that `miles validate` passes also plans.
    assert (directive_problem(value, kind="time") is None) == (slurm_time_seconds(value) is not None)


@pytest.mark.parametrize("value", ["INFINITE", "unlimited"])
def test_unlimited_time_plans(value: str) -> None:
    s = spec(slurm={"time": value})
    assert f"#SBATCH --time={value}" in render_script(s, make_plan(s)).splitlines()


def test_mem_format() -> None:
    refused(spec(cluster={"mem_per_node": "lots"}), "cluster.mem_per_node", "Slurm memory size")


def test_setup_line_with_newline_is_refused() -> None:
    refused(
        spec(slurm={"setup": ["module load a\nrm -rf /"]}),
        "slurm.setup[0] contains a newline",
        "several elements of slurm.setup",
    )


def test_container_mount_without_commas() -> None:
    refused(
        spec(slurm={"container_runtime": "pyxis", "container_image": "i", "container_mounts": ["/a:/a,/b:/b"]}),
        "slurm.container_mounts[0]",
        "one list element per mount",
    )


def test_every_problem_is_reported_at_once() -> None:
    msg = refused(spec(perf={"tp": 3}, slurm={"partition": "a b"}, cluster={"actor_num_gpus_per_node": 16}))
    assert "5 problem(s)" in msg
    for needle in (
        "slurm.partition",
        "perf.tp x perf.pp",
        "cluster.actor_num_gpus_per_node = 16",
        "model.num_key_value_heads",
    ):
        assert needle in msg


def test_context_parallelism_needs_the_sdpa_attention() -> None:
    refused(
        spec(perf={"tp": 2, "cp": 2, "sequence_parallel": True, "attention_backend": "unfused"}),
        "perf.cp = 2",
        'perf.attention_backend = "sdpa"',
    )
    plan = make_plan(spec(perf={"tp": 2, "cp": 2, "sequence_parallel": True, "attention_backend": "sdpa"}))
    assert (plan.mesh.tp, plan.mesh.cp, plan.mesh.dp) == (2, 2, 2)
    assert make_plan(spec(perf={"tp": 2, "cp": 2, "sequence_parallel": True})).mesh.cp == 2  # auto is SDPA
