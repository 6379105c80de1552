"""``[perf] fused_kernels``: the chunked log-prob/entropy and miles' RMSNorm equal the plain paths (one process).

The TP=2 model-level check (same log-probs, entropies and gradients as the
default spec) and a full GRPO step against FSDP run in ``megatron_worker.py``
(scenario ``fused``, checked in ``test_megatron_actor.py``).
"""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is the [megatron] extra; scripts/test installs it")

from miles.train.megatron import logprobs as lp_mod  # noqa: E402
from miles.train.megatron.norm import RMSNorm  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.mark.parametrize(("temperature", "vocab_size"), [(1.0, 37), (0.7, 33)])
def test_chunked_logprobs_equal_plain_values_and_gradients(
    monkeypatch: pytest.MonkeyPatch, temperature: float, vocab_size: int
) -> None:
    monkeypatch.setattr(lp_mod, "CHUNK_ELEMENTS", 5 * 37)  # 5 rows per chunk: 3 chunks of a [2, 7] batch
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 37, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, vocab_size, (2, 7), generator=g)
    w_lp, w_ent = torch.randn(2, 7, generator=g), torch.randn(2, 7, generator=g)
    out = {}
    for chunked in (False, True):
        x = logits.clone().requires_grad_(True)
        lp, ent = lp_mod.vocab_parallel_logprobs_and_entropy(
            x, targets, vocab_start=0, vocab_size=vocab_size, temperature=temperature, chunked=chunked
        )
        (lp * w_lp + ent * w_ent).sum().backward()
        assert x.grad is not None
        out[chunked] = (lp.detach(), ent.detach(), x.grad)
    for a, b in zip(out[True], out[False], strict=True):
        assert _rel(a, b) < 1e-6  # both paths compute in float32
    assert not out[True][2][..., vocab_size:].any()  # padding columns get no gradient


def test_chunked_logprobs_entropy_unused_and_no_grad() -> None:
    """The loss often ignores the entropy (``entropy_coef = 0``); log-prob-only passes run without autograd."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 11, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 11, (3,), generator=g)
    grads = []
    for chunked in (False, True):
        x = logits.clone().requires_grad_(True)
        lp, _ = lp_mod.vocab_parallel_logprobs_and_entropy(x, targets, vocab_start=0, vocab_size=11, chunked=chunked)
        lp.sum().backward()
        grads.append(x.grad)
        with torch.no_grad():
            lp2, _ = lp_mod.vocab_parallel_logprobs_and_entropy(
                x, targets, vocab_start=0, vocab_size=11, chunked=chunked
            )
        assert torch.allclose(lp2, lp.detach(), rtol=0, atol=1e-6)
    assert grads[0] is not None and grads[1] is not None
    assert _rel(grads[1], grads[0]) < 1e-6


def test_rmsnorm_matches_torch_norm_and_keeps_model_dtype() -> None:
    cfg = types.SimpleNamespace(params_dtype=torch.bfloat16, sequence_parallel=False)
    norm = RMSNorm(cfg, 16, eps=1e-6)
    assert norm.weight.dtype == torch.bfloat16 and [n for n, _ in norm.named_parameters()] == ["weight"]
    ref = torch.nn.RMSNorm(16, eps=1e-6)
    x = torch.randn(4, 3, 16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
        ref.weight.copy_(norm.weight.float())
    assert torch.allclose(norm.float()(x), ref(x), rtol=0, atol=1e-6)
    # Under sequence parallelism the tag tells Megatron's gradient finalisation to sum the weight's gradient over TP.
    assert norm.weight.sequence_parallel is False
    assert RMSNorm(
        types.SimpleNamespace(params_dtype=torch.float32, sequence_parallel=True), 16
    ).weight.sequence_parallel
