"""The FSDP2 actor on CUDA over NCCL: the CPU tests' scenarios on 1 and 2 GPUs (marked ``gpu``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.unit.train.tiny_model import write_tiny_qwen2
from tests.unit.train.worker_launch import Launch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (run on a GPU machine: pytest -m gpu)"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    root = tmp_path_factory.mktemp("fsdp_gpu")
    model_dir = root / "model"
    write_tiny_qwen2(str(model_dir))
    one = Launch(1, root / "ws1", model_dir, ["update"], device="cuda").results()
    two = Launch(
        2,
        root / "ws2",
        model_dir,
        ["update", "update_dynamic", "learn", "resume", "export", "bf16", "offload"],
        device="cuda",
    ).results()
    return {1: one, 2: two}


def test_gpu_world_size_1_and_2_agree(runs: dict[int, dict[str, Any]]) -> None:
    for name, w in runs[1]["update"]["weights"].items():
        torch.testing.assert_close(runs[2]["update"]["weights"][name], w, rtol=1e-4, atol=1e-5)
    for name, w in runs[2]["update"]["weights"].items():
        torch.testing.assert_close(runs[2]["update_dynamic"]["weights"][name], w, rtol=1e-4, atol=1e-5)


def test_gpu_learns_and_resumes_bit_for_bit(runs: dict[int, dict[str, Any]]) -> None:
    losses = [m["pg_loss"] for m in runs[2]["learn"]["metrics"]]
    assert losses[-1] < losses[0] - 0.1, losses
    w_a, w_b = runs[2]["resume"]["weights"]
    for name in w_a:
        assert torch.equal(w_a[name], w_b[name]), name


def test_gpu_export_and_logprobs_match_plain_hf(runs: dict[int, dict[str, Any]]) -> None:
    r = runs[2]["export"]
    torch.testing.assert_close(r["plain_logits"], r["fsdp_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(r["reloaded_logits"], r["fsdp_logits"], rtol=0, atol=1e-5)
    for direct, actor in zip(r["direct_logprobs"], r["actor_logprobs"], strict=True):
        torch.testing.assert_close(actor, direct, rtol=0, atol=1e-4)
    assert {w.dtype for w in runs[2]["bf16"]["weights"].values()} == {torch.bfloat16}


def test_gpu_offload_frees_memory_and_changes_nothing(runs: dict[int, dict[str, Any]]) -> None:
    r = runs[2]["offload"]
    assert r["footprint"] > 0 and r["left"] < r["footprint"] / 4, (r["footprint"], r["left"])
    w_a, _ = runs[2]["resume"]["weights"]  # the same two rollouts without offloading
    for name, w in r["weights"].items():
        assert torch.equal(w, w_a[name]), name
