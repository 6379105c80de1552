"""The layout itself: components, rank map, engines, ports, weight-update groups, JSON."""

from __future__ import annotations

import subprocess
import sys

from miles.plan import from_json, make_plan, ports, render_table, summary, to_json
from tests.unit.plan.plan_specs import cpu_spec, spec


def test_split_components_engines_first() -> None:
    plan = make_plan(
        spec(
            cluster={"rollout_num_nodes": 2, "actor_num_nodes": 3},
            train={"global_batch_size": 96},
            slurm={"partition": "train", "rollout_partition": "infer"},
        )
    )
    engines, trainers = plan.components
    assert (
        engines.het_group,
        engines.role,
        engines.nodes,
        engines.gpus_per_node,
        engines.tasks_per_node,
        engines.partition,
    ) == (0, "engines", 2, 8, 4, "infer")
    assert (
        trainers.het_group,
        trainers.role,
        trainers.nodes,
        trainers.gpus_per_node,
        trainers.tasks_per_node,
        trainers.partition,
    ) == (1, "trainers", 3, 8, 8, "train")
    assert (plan.engine_het_group, plan.trainer_het_group) == (0, 1)
    assert len(plan.engines) == 8 and plan.rollout_gpus == 16
    e5 = plan.engines[5]
    assert (e5.node, e5.local_index, e5.gpus, e5.het_group) == (1, 1, (2, 3), 0)


def test_rollout_gpus_on_one_partial_node() -> None:
    plan = make_plan(spec(cluster={"rollout_num_nodes": None, "rollout_num_gpus": 4}))
    assert plan.components[0].nodes == 1 and plan.components[0].gpus_per_node == 4 and len(plan.engines) == 2


def test_colocate_engines_share_trainer_gpus() -> None:
    plan = make_plan(spec("colocate", cluster={"actor_num_nodes": 2}, sglang={"rollout_num_gpus_per_engine": 4}))
    (comp,) = plan.components
    assert (comp.role, comp.nodes, comp.gpus_per_node, comp.tasks_per_node) == ("colocated", 2, 8, 8)
    assert len(plan.engines) == 4 and plan.rollout_gpus == plan.trainer_gpus == 16
    assert [(e.node, e.gpus) for e in plan.engines] == [
        (0, (0, 1, 2, 3)),
        (0, (4, 5, 6, 7)),
        (1, (0, 1, 2, 3)),
        (1, (4, 5, 6, 7)),
    ]
    assert plan.engine_het_group == plan.trainer_het_group == 0


def test_rank_map_follows_megatron_order() -> None:
    # 32 GPUs, TP2 CP2 PP2 -> DP4; order tp-cp-ep-dp-pp: tp fastest, then cp, dp, pp slowest.
    plan = make_plan(
        spec(
            cluster={"actor_num_nodes": 4},
            perf={"tp": 2, "cp": 2, "pp": 2, "attention_backend": "sdpa"},
            train={"global_batch_size": 64},
        )
    )
    assert (plan.mesh.dp, plan.mesh.world_size) == (4, 32)
    r = plan.trainer_ranks
    assert [(x.tp, x.cp, x.dp, x.pp) for x in r[:5]] == [
        (0, 0, 0, 0),
        (1, 0, 0, 0),
        (0, 1, 0, 0),
        (1, 1, 0, 0),
        (0, 0, 1, 0),
    ]
    assert (r[16].pp, r[16].dp, r[16].tp, r[16].cp) == (1, 0, 0, 0)
    assert (r[13].node, r[13].local_rank, r[13].gpu) == (1, 5, 5)
    # every coordinate tuple appears exactly once
    assert len({(x.tp, x.cp, x.dp, x.pp) for x in r}) == 32


def test_weight_update_group_per_pp_stage() -> None:
    plan = make_plan(spec(cluster={"actor_num_nodes": 2}, perf={"tp": 2, "pp": 2}, train={"global_batch_size": 64}))
    groups = plan.weight_update_groups
    assert [g.source_rank for g in groups] == [0, 8]
    for g in groups:
        src = plan.trainer_ranks[g.source_rank]
        assert (src.tp, src.cp, src.dp, src.pp) == (0, 0, 0, g.pp_stage)
        assert g.world_size == 1 + plan.rollout_gpus == 9
        assert g.engine_rank_offsets == (1, 3, 5, 7)
    assert [g.port for g in groups] == list(plan.ports.weight_update)
    assert plan.engines[2].ranks == (5, 6)


def test_ports_derive_from_job_id_and_avoid_ephemeral_range() -> None:
    s = spec(cluster={"rollout_num_nodes": 2})
    seen = set()
    for job_id in (0, 1, 198, 199, 12345, 987654321):
        p = make_plan(s, job_id=job_id).ports
        assert p.job_id == job_id
        assert p.base == ports.FLOOR + (job_id % ports.SLOTS) * ports.STRIDE
        every = [p.master, p.router, *p.weight_update, *p.engine_http, *p.engine_nccl]
        assert all(ports.FLOOR <= x < ports.CEILING for x in every)
        assert max(every) < p.base + ports.STRIDE
        # engines on one node never share a port; nothing collides with the trainer/router ports
        per_node = [(e.node, port) for e, port in zip(make_plan(s, job_id=job_id).engines, p.engine_http, strict=True)]
        assert len(set(per_node)) == len(per_node)
        assert len({p.master, p.router, *p.weight_update} & set(p.engine_http + p.engine_nccl)) == 0
        seen.add(p.base)
    assert len(seen) == 5  # 0 and 199 share a block; the others differ
    assert make_plan(s).ports.job_id is None


def test_cpu_colocate_slots() -> None:
    plan = make_plan(cpu_spec(cluster={"actor_num_gpus_per_node": 3}, train={"global_batch_size": 63}))
    (comp,) = plan.components
    assert plan.device == "cpu" and comp.gpus_per_node == 0 and comp.tasks_per_node == 3
    assert len(plan.engines) == 3 and all(e.tp == 1 for e in plan.engines)
    assert [e.gpus for e in plan.engines] == [(0,), (1,), (2,)]


def test_cpu_split_slots() -> None:
    plan = make_plan(cpu_spec("split", cluster={"rollout_num_gpus": 4, "rollout_num_nodes": 2}))
    engines, trainers = plan.components
    assert (engines.nodes, engines.tasks_per_node, engines.gpus_per_node) == (2, 2, 0)
    assert [(e.node, e.gpus) for e in plan.engines] == [(0, (0,)), (0, (1,)), (1, (0,)), (1, (1,))]
    plan = make_plan(cpu_spec("split", cluster={"rollout_num_gpus": None, "rollout_num_nodes": 3}))
    assert len(plan.engines) == 3 and plan.components[0].tasks_per_node == 1


def test_cpus_per_task_from_cpus_per_node() -> None:
    plan = make_plan(spec(cluster={"cpus_per_node": 64}))
    assert [c.cpus_per_task for c in plan.components] == [16, 8]


def test_json_round_trip() -> None:
    plan = make_plan(
        spec(cluster={"actor_num_nodes": 2}, perf={"tp": 2, "pp": 2}, train={"global_batch_size": 64}), job_id=77
    )
    assert from_json(to_json(plan)) == plan
    cpu = make_plan(cpu_spec())
    assert from_json(to_json(cpu)) == cpu


def test_table_abbreviates_big_rank_maps() -> None:
    s = spec(cluster={"actor_num_nodes": 64, "rollout_num_nodes": 64}, train={"global_batch_size": 256})
    text = render_table(s, make_plan(s))
    assert "511" in text and "..." in text and "\n│ 100 " not in text
    assert "Weight-update groups" in text and "MASTER_PORT" in text


def test_summary_mentions_layout_and_unchecked() -> None:
    s = spec(model={"num_attention_heads": None})
    text = summary(s, make_plan(s))
    assert text.startswith("valid: test.toml: split")
    assert "unchecked: model.num_attention_heads" in text and "warning: split mode" in text


def test_planner_path_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from miles.plan import make_plan, render_script, render_table, to_json\n"
        "from miles.spec.tables import Spec\n"
        "import miles.plan.golden\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
