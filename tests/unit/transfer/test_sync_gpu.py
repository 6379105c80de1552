"""The GPU path: engine on cuda:1 (bf16), trainer on cuda:0, weight sync over NCCL (needs 2 GPUs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from miles.engine.core import Engine, GenerationRequest
from miles.engine.local import LocalEngine
from miles.engine.sampling import SamplingParams
from miles.job.ports import free_port
from miles.transfer.checksum import tensor_checksum
from miles.transfer.sync import WeightSync
from tests.unit.transfer.test_sync import checksums, greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL between two processes)"),
]


def test_cuda_greedy_equals_hf_and_nccl_sync_is_bit_exact(tmp_path: Path) -> None:
    from miles.model.builtin import materialize

    model_dir = materialize("tiny-arith", tmp_path / "tiny", seed=0, dtype="bfloat16")
    engine = Engine(model_dir, device="cuda:0", dtype="bfloat16")
    ids = engine.encode("12+3=")
    out = engine.generate([GenerationRequest(ids, SamplingParams(max_new_tokens=12, temperature=0.0))])[0]
    ref = engine.model.generate(
        torch.tensor([ids], device="cuda:0"),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=sorted(engine.eos_ids),
        pad_token_id=engine.pad_id,
    )
    assert out.output_ids == ref[0, len(ids) :].tolist()

    weights = {k: v.detach().clone() for k, v in engine.state().items()}
    noisy = {k: (v.float() + 0.5 * torch.randn_like(v.float())).to(v.dtype) for k, v in weights.items()}
    with LocalEngine(model_dir, extra_args=["--device", "cuda:1", "--dtype", "bfloat16"]) as proc:
        base = greedy(proc.url)[0]
        sync = WeightSync(
            [proc.url],
            "127.0.0.1",
            free_port(),
            backend="nccl",
            device="cuda:0",
            bucket_bytes=4096,
            group_name="sync_gpu_test",
            timeout_s=300,
        )
        try:
            sync.sync(noisy.items(), weight_version=1)
            got = checksums(proc.url)
            assert all(got[k] == tensor_checksum(v) for k, v in noisy.items())
            assert greedy(proc.url)[0] != base
            sync.sync(weights.items(), weight_version=2)
            assert greedy(proc.url) == (base, "2")
        finally:
            sync.close()
