"""Flattened buckets: SGLang's byte layout, sizes, order and mixed dtypes."""

from __future__ import annotations

import pytest
import torch

from miles.transfer.bucket import bucket_bytes, buckets, dtype_name, unflatten


def named() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("a", torch.randn(3, generator=g).to(torch.bfloat16)),  # 6 bytes: the next float32 starts misaligned
        ("b", torch.randn(4, 5, generator=g)),
        ("c", torch.arange(7, dtype=torch.int64)),
        ("d", torch.randn(2, 3, generator=g).to(torch.float16)),
        ("e", torch.randn(64, 64, generator=g)),
    ]


def test_round_trip_is_bit_exact_for_mixed_dtypes() -> None:
    (bucket,) = list(buckets(named(), 1 << 20))
    meta = bucket.metadata()
    assert meta["dtypes"] == ["bfloat16", "float32", "int64", "float16", "float32"]
    flat = bucket.flatten()
    assert flat.dtype == torch.uint8 and flat.numel() == bucket.size == bucket_bytes(meta["dtypes"], meta["shapes"])
    # SGLang's layout: each tensor's bytes, concatenated in names order
    expect = torch.cat([t.contiguous().view(-1).view(torch.uint8) for _, t in named()])
    assert torch.equal(flat, expect)
    for (name, t), (got_name, got) in zip(named(), unflatten(flat, **meta), strict=True):
        assert name == got_name and got.dtype == t.dtype and torch.equal(got, t)


def test_bucket_sizes_and_order() -> None:
    parts = list(buckets(named(), 100))
    assert [n for b in parts for n in b.names] == ["a", "b", "c", "d", "e"]
    assert all(b.size <= 100 for b in parts if len(b.names) > 1)
    assert parts[-1].names == ["e"] and parts[-1].size == 64 * 64 * 4  # larger than a bucket: alone
    assert len(list(buckets(named(), 1 << 30))) == 1
    with pytest.raises(ValueError):
        list(buckets(named(), 0))
    with pytest.raises(ValueError, match="does not match"):
        unflatten(torch.zeros(3, dtype=torch.uint8), ["x"], ["float32"], [[1]])
    assert dtype_name(torch.bfloat16) == "bfloat16"
