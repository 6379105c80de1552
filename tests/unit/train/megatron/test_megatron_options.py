"""Miles' MoE router flags and attention backends reach megatron-core as its own options."""

from __future__ import annotations

import pytest
import torch

from miles.errors import UserError
from miles.plan import PlanError, trainer_mesh
from miles.spec.tables import PerfConfig, Spec
from miles.train.megatron.config import LOCAL_ATTENTION, check_runtime, megatron_attention_backend
from tests.unit.train.megatron.test_megatron_mapping import arch, mesh_of


def test_moe_router_keys_become_transformer_config_fields() -> None:
    pytest.importorskip("megatron.core")
    from miles.train.megatron.config import transformer_config

    perf = PerfConfig(ep=2, moe_aux_loss_coeff=0.01, moe_router_load_balancing_type="aux_loss", moe_router_dtype="fp32")
    c = transformer_config(arch("qwen3_moe"), mesh_of(perf), perf, dtype=torch.float32, use_te=False)
    assert (c.moe_aux_loss_coeff, c.moe_router_load_balancing_type, c.moe_router_dtype) == (0.01, "aux_loss", "fp32")
    assert c.moe_token_dispatcher_type == "alltoall"
    ep2 = PerfConfig(ep=2)
    default = transformer_config(arch("qwen3_moe"), mesh_of(ep2), ep2, dtype=torch.float32, use_te=False)
    assert (default.moe_aux_loss_coeff, default.moe_router_load_balancing_type, default.moe_router_dtype) == (
        0.0,
        "none",
        None,
    )


def test_permute_fusion_needs_transformer_engine() -> None:
    with pytest.raises(UserError, match="moe_permute_fusion = true needs Transformer Engine"):
        check_runtime(PerfConfig(moe_permute_fusion=True), use_te=False)
    check_runtime(PerfConfig(moe_permute_fusion=True), use_te=True)


@pytest.mark.parametrize("name", ["flash", "fused", "auto", "sdpa"])
def test_miles_attention_backends_run_sdpa_without_te_and_allow_context_parallelism(name: str) -> None:
    assert LOCAL_ATTENTION[name] == "sdpa"
    perf = PerfConfig(backend="megatron", cp=2, attention_backend=name)  # type: ignore[arg-type]
    assert trainer_mesh(Spec(perf=perf), 2).cp == 2


def test_local_is_megatrons_unfused_attention() -> None:
    assert LOCAL_ATTENTION["local"] == LOCAL_ATTENTION["unfused"] == "unfused"
    with pytest.raises(PlanError, match="perf.cp = 2 needs miles' context-parallel attention"):
        trainer_mesh(Spec(perf=PerfConfig(backend="megatron", cp=2, attention_backend="local")), 2)


def test_with_te_miles_names_are_megatrons_and_miles_own_leave_it_to_auto() -> None:
    assert [megatron_attention_backend(n) for n in ("flash", "fused", "local", "auto", "unfused", "sdpa")] == [
        "flash",
        "fused",
        "local",
        "auto",
        "auto",
        "auto",
    ]


def test_flash_swaps_in_sdpa_core_attention_on_the_local_spec() -> None:
    pytest.importorskip("megatron.core")
    from miles.train.megatron.attention import SdpaAttention
    from miles.train.megatron.config import layer_spec

    flash = layer_spec(arch("qwen2"), use_te=False, attention_backend="flash")
    local = layer_spec(arch("qwen2"), use_te=False, attention_backend="local")
    assert flash.submodules.self_attention.submodules.core_attention is SdpaAttention
    assert local.submodules.self_attention.submodules.core_attention is not SdpaAttention
