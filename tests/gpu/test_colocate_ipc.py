"""Colocated weight sync on one GPU: this process (trainer) hands CUDA tensors to an engine process by CUDA IPC."""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from miles.engine.local import LocalEngine
from miles.sglang import protocol as proto
from miles.transfer.bucket import Bucket
from miles.transfer.checksum import tensor_checksum
from miles.transfer.colocate import TensorSync, bucket_metadata, serialize_bucket

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA IPC between two processes)"),
]

PROMPT = [4, 5, 13, 6]


def _post(url: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(
        url + path, data=json.dumps(body or {}).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def _greedy(url: str) -> tuple[list[int], str]:
    out = _post(
        url,
        "/generate",
        proto.generate_body(
            input_ids=PROMPT, sampling=proto.sampling_params(max_new_tokens=10, temperature=0.0, ignore_eos=True)
        ),
    )
    return out["output_ids"], out["meta_info"]["weight_version"]


def test_cuda_ipc_weights_land_bit_for_bit(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from miles.model.builtin import materialize

    model_dir = materialize("tiny-arith", tmp_path / "tiny", seed=0, dtype="bfloat16")
    device = torch.device("cuda:0")
    original = {k: v.to(device) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    g = torch.Generator(device=device).manual_seed(0)
    noisy = {
        k: (v.float() + 0.5 * torch.randn(v.shape, generator=g, device=device)).to(v.dtype) for k, v in original.items()
    }

    bucket = Bucket()
    bucket.add("x", noisy["model.norm.weight"])
    flat = bucket.flatten(device)
    raw = base64.b64decode(serialize_bucket(flat, bucket_metadata(bucket)))
    assert b"rebuild_cuda_tensor" in raw, "a CUDA bucket must travel as a CUDA-IPC handle"
    assert str(torch.cuda.get_device_properties(0).uuid).encode() in raw, "the GPU must be named by UUID"

    with LocalEngine(
        model_dir, extra_args=["--device", "cuda:0", "--dtype", "bfloat16"], startup_timeout_s=240
    ) as proc:
        base = _greedy(proc.url)[0]
        sync = TensorSync([proc.url], bucket_bytes=64 * 1024, device=device, timeout_s=120)
        try:
            stats = sync.sync(noisy.items(), weight_version=1)
            print(
                f"colocated CUDA-IPC sync: {stats.tensors} tensors, {stats.bytes} bytes, {stats.buckets} buckets, "
                f"{stats.seconds:.3f} s"
            )
            got = _post(proc.url, "/weights_checker", {"action": "checksum"})["ranks"][0]["checksums"]
            assert {k: got[k] for k in noisy} == {k: tensor_checksum(v) for k, v in noisy.items()}
            ids, version = _greedy(proc.url)
            assert version == "1" and ids != base
            sync.sync(original.items(), weight_version=2)
            assert _greedy(proc.url) == (base, "2")
        finally:
            sync.close()
