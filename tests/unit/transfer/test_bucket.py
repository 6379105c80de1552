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


def test_flatten_into_a_reused_buffer_writes_the_same_bytes() -> None:
    (bucket,) = list(buckets(named(), 1 << 20))
    buf = torch.full((bucket.size + 64,), 7, dtype=torch.uint8)
    flat = bucket.flatten(out=buf)
    assert flat.data_ptr() == buf.data_ptr() and torch.equal(flat, bucket.flatten())
    assert torch.equal(buf[bucket.size :], torch.full((64,), 7, dtype=torch.uint8))  # nothing past the bucket
    with pytest.raises(ValueError, match="at least"):
        bucket.flatten(out=torch.empty(bucket.size - 1, dtype=torch.uint8))
    # strided tensors are gathered straight into the buffer, aligned (float32 at 0) or not (after 6 bytes)
    g = torch.Generator().manual_seed(1)
    strided = [
        ("t", torch.randn(5, 7, generator=g).t()),
        ("h", torch.randn(3, generator=g).to(torch.bfloat16)),
        ("u", torch.randn(4, 6, generator=g)[:, ::2]),
    ]
    (b2,) = list(buckets(strided, 1 << 20))
    got = unflatten(b2.flatten(out=torch.empty(b2.size, dtype=torch.uint8)), **b2.metadata())
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(strided, got, strict=True))


def test_zero_copy_only_for_bytes_already_back_to_back() -> None:
    storage = torch.randn(100)
    adjacent = list(buckets([("a", storage[:10]), ("b", storage[10:30].view(4, 5))], 1 << 20))[0]
    view = adjacent.zero_copy()
    assert view is not None and view.data_ptr() == storage.data_ptr() and torch.equal(view, adjacent.flatten())
    later = list(buckets([("a", storage[40:50]), ("b", storage[50:60])], 1 << 20))[0]
    view = later.zero_copy()
    assert view is not None and view.data_ptr() == storage[40:].data_ptr() and torch.equal(view, later.flatten())
    gap = list(buckets([("a", storage[:10]), ("b", storage[11:20])], 1 << 20))[0]
    swapped = list(buckets([("b", storage[10:20]), ("a", storage[:10])], 1 << 20))[0]
    strided = list(buckets([("t", torch.randn(4, 5).t())], 1 << 20))[0]
    elsewhere = list(buckets([("a", storage[:10])], 1 << 20))[0]
    assert gap.zero_copy() is None and swapped.zero_copy() is None and strided.zero_copy() is None
    assert elsewhere.zero_copy("meta") is None  # not on the device the bytes must be sent from
    param = torch.nn.Parameter(torch.randn(3, 4))  # a trainer's parameter: viewed without autograd
    single = list(buckets([("w", param)], 1))[0]
    view = single.zero_copy()
    assert view is not None and not view.requires_grad and torch.equal(view, single.flatten())
