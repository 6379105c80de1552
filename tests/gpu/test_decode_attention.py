"""The Triton decode attention (miles/engine/decode_attention.py) against SDPA with the length mask it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from miles.engine import decode_attention as attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton)"),
]


@pytest.mark.parametrize(
    ("b", "n_kv", "group", "d", "dtype"),
    [
        (256, 2, 7, 64, torch.bfloat16),  # Qwen2.5-0.5B's heads at the benchmark batch
        (5, 2, 2, 16, torch.float32),  # the tiny test models
        (3, 4, 1, 128, torch.float16),  # no grouping, a wide head
        (17, 8, 4, 128, torch.bfloat16),  # Qwen2.5-7B's heads
    ],
)
def test_matches_sdpa_over_each_rows_own_slots(b: int, n_kv: int, group: int, d: int, dtype: torch.dtype) -> None:
    assert attention.supported(torch.device("cuda"), d, group)
    g = torch.Generator(device="cuda").manual_seed(b * 7 + d)
    length = 320
    k = torch.randn((b + 3, n_kv, length, d), generator=g, device="cuda", dtype=dtype)
    v = torch.randn((b + 3, n_kv, length, d), generator=g, device="cuda", dtype=dtype)
    qkv = torch.randn((b, 1, n_kv * group + 2 * n_kv, d), generator=g, device="cuda", dtype=dtype)
    q = qkv[:, :, : n_kv * group].reshape(b, n_kv, group, d)  # a strided view, as the decoder passes it
    pos = torch.randint(0, length, (b,), generator=g, device="cuda")
    pos[0] = 0  # a row at its first slot
    pos[-1] = length - 1  # and one that fills the cache
    scale = d**-0.5
    got = attention.decode_attention(q, k, v, pos, scale)
    visible = torch.arange(length, device="cuda").unsqueeze(0) <= pos.unsqueeze(1)
    bias = torch.zeros((b, length), device="cuda", dtype=dtype).masked_fill_(~visible, float("-inf"))
    want = F.scaled_dot_product_attention(
        q.float(), k[:b].float(), v[:b].float(), attn_mask=bias.float().view(b, 1, 1, length), scale=scale
    )
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    assert got.dtype == dtype and got.shape == (b, n_kv, group, d)
