"""The trainer mesh the backends build their process groups from, and the layout rules it is checked by.

Each layout rule is stated once, in the planner: ``miles plan`` applies it before
submitting, and every trainer rank applies it again to the model directory it
really loads (``trainer_mesh(spec, world_size, model_dir)``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miles.plan import PlanError, trainer_mesh
from miles.spec.tables import ModelConfig, PerfConfig, Spec


def _model(tmp_path: Path, **cfg: int) -> str:
    base = {"model_type": "qwen2", "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps({**base, **cfg}))
    return str(tmp_path)


def _spec(**perf: object) -> Spec:
    return Spec(model=ModelConfig(builtin="tiny-arith"), perf=PerfConfig(backend="megatron", **perf))  # type: ignore[arg-type]


def test_the_mesh_of_a_valid_layout(tmp_path: Path) -> None:
    mesh = trainer_mesh(_spec(tp=2), 4, _model(tmp_path))
    assert (mesh.tp, mesh.pp, mesh.cp, mesh.dp, mesh.ep, mesh.etp, mesh.world_size) == (2, 1, 1, 2, 1, 2, 4)
    moe = trainer_mesh(_spec(tp=2, ep=2, etp=1, sequence_parallel=True), 4, _model(tmp_path, num_experts=4))
    assert (moe.ep, moe.etp, moe.expert_dp) == (2, 1, 2)
    assert trainer_mesh(_spec(cp=2, attention_backend="sdpa"), 2, _model(tmp_path)).cp == 2


@pytest.mark.parametrize(
    "perf,world,cfg,message",
    [
        ({"tp": 4}, 4, {}, "perf.tp"),  # 2 KV heads do not split 4 ways
        ({"pp": 3}, 3, {}, "perf.pp = 3 does not divide model.num_layers = 4"),
        ({"pp": 8}, 8, {}, "exceeds model.num_layers"),
        ({"tp": 2}, 3, {}, "does not divide the 3 trainer GPUs"),
        ({"ep": 3}, 3, {"num_experts": 4}, "perf.ep = 3 does not divide"),
        ({"ep": 2}, 2, {}, "the model has no experts"),
        ({"tp": 2}, 2, {"num_experts": 4}, "sequence_parallel = true"),
        ({"cp": 2, "attention_backend": "unfused"}, 2, {}, 'attention_backend = \\"sdpa\\"'),
    ],
)
def test_a_mesh_the_model_cannot_take_is_refused_with_the_fix(
    tmp_path: Path, perf: dict[str, object], world: int, cfg: dict[str, int], message: str
) -> None:
    with pytest.raises(PlanError, match=message) as err:
        trainer_mesh(_spec(**perf), world, _model(tmp_path, **cfg))
    assert "Fix:" in str(err.value)


def test_the_planner_and_the_runtime_share_one_mesh(tmp_path: Path) -> None:
    """make_plan's mesh and the runtime's are the same object for the same model and world."""
    from miles.plan import make_plan
    from miles.spec.tables import ClusterConfig

    model = _model(tmp_path)
    spec = Spec(
        model=ModelConfig(hf_checkpoint=model),
        perf=PerfConfig(backend="megatron", tp=2),
        cluster=ClusterConfig(actor_num_gpus_per_node=4, gpus_per_node=4),
    )
    assert make_plan(spec).mesh == trainer_mesh(spec, 4, model)
