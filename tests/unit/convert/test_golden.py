"""``miles convert`` on the project's example Miles scripts: golden specs and tables, and the layouts they plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from miles.convert import convert
from miles.convert.golden import ACCEPT, GOLDEN, render, script_paths
from miles.plan import make_plan
from miles.plan.golden import diff
from miles.spec import load_spec

SCRIPTS = {p.stem: p for p in script_paths()}


def test_the_examples_are_there() -> None:
    assert set(SCRIPTS) >= {"run-qwen3-4B", "run-qwen3-30B-A3B", "run-qwen3-8B-split", "run-qwen3-4B-async"}


@pytest.mark.parametrize("stem", sorted(SCRIPTS))
def test_converted_spec_and_table_match_the_golden_files(stem: str) -> None:
    for name, text in render(SCRIPTS[stem]).items():
        expected = (GOLDEN / name).read_text() if (GOLDEN / name).exists() else ""
        assert expected == text, f"{diff(name, expected, text)}\naccept with: {ACCEPT}"


def _plan(stem: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    conv = convert(SCRIPTS[stem])
    path = tmp_path / f"{stem}.toml"
    path.write_text(conv.spec_text)
    spec = load_spec(path)  # the written file itself, through the strict loader
    return conv, spec, make_plan(spec)


def test_dense_recipe_is_colocated_on_one_node_as_miles_runs_it(tmp_path: Path) -> None:
    conv, spec, plan = _plan("run-qwen3-4B", tmp_path)
    assert conv.exit_code == 0
    assert plan.mode == "colocate" and [c.nodes for c in plan.components] == [1]
    assert (plan.mesh.tp, plan.mesh.dp, len(plan.engines), plan.engine_tp) == (2, 4, 4, 2)
    assert spec.train.balance_data and spec.perf.attention_backend == "flash"
    assert spec.ckpt.ref_load == "/root/Qwen3-4B_torch_dist"


def test_moe_recipe_keeps_its_router_flags_and_expert_parallel_layout(tmp_path: Path) -> None:
    conv, spec, plan = _plan("run-qwen3-30B-A3B", tmp_path)
    assert conv.exit_code == 0  # grouped GEMM and the precision-aware optimizer change speed/memory only
    p = spec.perf
    assert (p.moe_router_dtype, p.moe_permute_fusion, p.moe_router_load_balancing_type) == ("fp32", True, "none")
    assert (plan.mesh.tp, plan.mesh.ep, plan.mesh.expert_dp, plan.mesh.world_size) == (4, 8, 2, 16)
    assert [(c.role, c.nodes) for c in plan.components] == [("engines", 1), ("trainers", 2)]
    statuses = {r.use.flag: r.status for r in conv.rows}
    assert statuses["--moe-grouped-gemm"] == statuses["--use-precision-aware-optimizer"] == "unsupported"


def test_split_recipe_of_one_node_is_one_job_of_eight_gpus(tmp_path: Path) -> None:
    conv, spec, plan = _plan("run-qwen3-8B-split", tmp_path)
    assert conv.exit_code == 0 and spec.cluster.mode == "split"
    (comp,) = plan.components
    assert (comp.nodes, comp.gpus_per_node) == (1, 8)
    assert sorted(g for e in plan.engines for g in e.gpus) == [0, 1, 2, 3]
    assert sorted(r.gpu for r in plan.trainer_ranks) == [4, 5, 6, 7]


def test_async_recipe_becomes_train_async(tmp_path: Path) -> None:
    conv, spec, plan = _plan("run-qwen3-4B-async", tmp_path)
    assert conv.exit_code == 0 and "NO HOME" not in conv.table_text
    assert "train_async = true  # train_async.py: rollout N+1 is generated while rollout N trains" in conv.spec_text
    assert spec.run.train_async
    assert plan.mode == "split"
