"""``miles bench train`` on CPU: the FSDP actor's real GRPO step on a tiny random model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import load_report, positive_finite


def test_train_reports_tokens_per_s_and_flops(tiny_config: Path, tmp_path: Path) -> None:
    """Padded against packed micro-batches on an RL length mix: each row's tokens/s counts the real tokens only."""
    from miles.bench.train import rl_response_lengths

    out = tmp_path / "train.json"
    # its own process: the suite forms (and destroys) a torch.distributed group
    cmd = [
        sys.executable,
        "-m",
        "miles.cli",
        "bench",
        "train",
        "--config",
        str(tiny_config),
        "--seq-len",
        "32",
        "--batch",
        "4",
        "--lengths",
        "rl",
        "--max-tokens-per-gpu",
        "64",
        "--variant",
        "qkv_format=bshd",
        "qkv_format=thd",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--peak-tflops",
        "1.0",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tokens_per_s" in proc.stdout  # the table
    report = load_report(out, "train")
    padded, packed = report["rows"]
    assert (padded["qkv_format"], packed["qkv_format"]) == ("bshd", "thd")
    prompt = 8  # min(16, seq_len // 4)
    real = sum(prompt + max(1, min(r, 32 - prompt)) for r in rl_response_lengths(4, 32, seed=0))
    assert real < 4 * 32  # the mix is not all at the limit
    for row in (padded, packed):
        assert row["backend"] == "fsdp" and row["world"] == 1
        for key in ("step_s", "tokens_per_s", "tflops_per_device", "mfu", "of_matmul"):
            assert positive_finite(row[key]), (key, row)
        assert row["tokens_per_step"] == real
        assert abs(row["tokens_per_s"] * row["step_s"] - real) < 1e-6
        assert abs(row["mfu"] - row["tflops_per_device"] / 1.0) < 1e-12
    summary = report["summary"]
    assert summary["peak_source"] == "flag"
    assert abs(summary["packed_speedup_fsdp"] - packed["tokens_per_s"] / padded["tokens_per_s"]) < 1e-9
    assert positive_finite(summary["matmul_tflops_measured"])


def test_train_on_two_ranks_shares_rank0s_model(tiny_config: Path, tmp_path: Path) -> None:
    """Under torchrun without --workdir, both ranks load the model rank 0 wrote (regression: each rank made its own
    temporary directory and rank 1 found no model); the report counts both ranks' devices."""
    out = tmp_path / "train2.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "miles.cli",
        "bench",
        "train",
        "--config",
        str(tiny_config),
        "--seq-len",
        "32",
        "--batch",
        "4",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--peak-tflops",
        "1.0",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = load_report(out, "train")["rows"]
    assert row["world"] == 2
    assert abs(row["tokens_per_s_per_device"] * 2 - row["tokens_per_s"]) < 1e-6


def test_variants_parse_perf_fields_and_refuse_typos() -> None:
    import pytest

    from miles.bench.train import parse_variant
    from miles.errors import UserError

    assert parse_variant("default") == ({}, None, {})
    assert parse_variant("attention_backend=sdpa,fused_kernels=true,micro_batch=4") == (
        {"attention_backend": "sdpa", "fused_kernels": True},
        4,
        {},
    )
    assert parse_variant("qkv_format=bshd,tp=2") == ({"tp": 2}, None, {"qkv_format": "bshd"})
    for bad in ("attention=sdpa", "fused_kernels", "backend=fsdp", "micro_batch=0", "qkv_format=packed"):
        with pytest.raises(UserError, match="--variant"):
            parse_variant(bad)


def test_packed_rows_name_the_document_attention_kernel() -> None:
    """A CPU has neither varlen flash attention nor FlexAttention's backward: packed rows run the grouped SDPA."""
    from miles.bench.train import packed_kernel

    assert packed_kernel({"hidden_size": 64, "num_attention_heads": 4}, "cpu", "float32") == "grouped"
    assert packed_kernel({"hidden_size": 64, "num_attention_heads": 4, "head_dim": 32}, "cpu", "bfloat16") == "grouped"
