"""The policy loss, KL estimators and aggregation against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from miles.algo.loss import (
    LossConfig,
    LossInputs,
    aggregation_for,
    kl_penalty,
    logprobs_and_entropy,
    policy_loss,
    token_weights,
)
from miles.spec.tables import GrpoConfig


def _row(*xs: float) -> torch.Tensor:
    return torch.tensor([list(xs)], dtype=torch.float32)


def test_kl_estimators() -> None:
    lp, ref = torch.tensor([0.0, -1.0]), torch.tensor([-1.0, 0.0])  # d = lp - ref = [1, -1]
    assert kl_penalty(lp, ref, "k1").tolist() == [1.0, -1.0]
    assert kl_penalty(lp, ref, "k2").tolist() == [0.5, 0.5]
    # k3 = exp(-d) - 1 + d
    assert kl_penalty(lp, ref, "k3").tolist() == pytest.approx([math.exp(-1), math.e - 2], abs=1e-6)
    assert kl_penalty(lp, ref, "low_var_kl").tolist() == pytest.approx([math.exp(-1), math.e - 2], abs=1e-6)
    far = torch.tensor([-20.0]), torch.tensor([0.0])  # k3 = e^20 - 21
    assert kl_penalty(*far, "k3").item() == pytest.approx(math.exp(20) - 21, rel=1e-5)
    assert kl_penalty(*far, "low_var_kl").item() == 10.0


def test_logprobs_and_entropy_with_temperature() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])  # probs .25, .75
    lp, ent = logprobs_and_entropy(logits, torch.tensor([1]))
    assert lp.item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    lp2, _ = logprobs_and_entropy(logits.to(torch.bfloat16), torch.tensor([1]), temperature=2.0)
    assert lp2.dtype == torch.float32
    assert lp2.item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))), abs=1e-2)  # bf16 logits


def _ppo(cfg: LossConfig, ratios: list[float], adv: list[float]) -> tuple[torch.Tensor, dict, torch.Tensor]:
    lp = torch.log(_row(*ratios)).requires_grad_(True)
    n = len(ratios)
    mask = torch.ones(1, n)
    loss, m = policy_loss(
        cfg, LossInputs(logprobs=lp, old_logprobs=torch.zeros(1, n), advantages=_row(*adv), mask=mask, weights=mask / n)
    )
    loss.backward()
    assert lp.grad is not None
    return loss, m, lp.grad


def test_ppo_clip() -> None:
    # ratio 1.5, A=+1 -> clipped at 1.2 (-1.2); ratio .5, A=+1 -> -0.5; ratio 1.5, A=-1 -> 1.5; ratio .5, A=-1 -> 0.8
    # clipped
    loss, m, grad = _ppo(LossConfig(eps_clip=0.2), [1.5, 0.5, 1.5, 0.5], [1, 1, -1, -1])
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert m["clip_frac"].item() == pytest.approx(0.5)
    # d/dlp of -A*ratio*w where unclipped: -1*.5/4 and +1*1.5/4; zero where clipped
    assert grad.tolist()[0] == pytest.approx([0.0, -0.125, 0.375, 0.0])
    assert m["ratio_max"].item() == pytest.approx(1.5) and m["ratio_min"].item() == pytest.approx(0.5)
    assert m["ppo_kl"].item() == pytest.approx(-(2 * math.log(1.5) + 2 * math.log(0.5)) / 4, abs=1e-6)


def test_clip_higher() -> None:
    loss, m, _ = _ppo(LossConfig(eps_clip=0.2, eps_clip_high=0.6), [1.5, 0.5, 1.5, 0.5], [1, 1, -1, -1])
    assert loss.item() == pytest.approx((-1.5 - 0.5 + 1.5 + 0.8) / 4)
    assert m["clip_frac"].item() == pytest.approx(0.25)


def test_dual_clip_bounds_negative_advantages_only() -> None:
    # ratio 4, A=-1: PPO gives max(4, 1.2) = 4; dual clip c=3 caps it at 3 (no gradient)
    loss, m, grad = _ppo(LossConfig(eps_clip=0.2, eps_clip_c=3.0), [4.0], [-1.0])
    assert loss.item() == pytest.approx(3.0)
    assert m["dual_clip_frac"].item() == 1.0
    assert grad.item() == 0.0
    # ratio 4, A=+1: max(-4, -1.2) = -1.2, dual clip not involved
    loss, m, _ = _ppo(LossConfig(eps_clip=0.2, eps_clip_c=3.0), [4.0], [1.0])
    assert loss.item() == pytest.approx(-1.2)
    assert m["dual_clip_frac"].item() == 0.0
    # ratio 2, A=-1: 2 < 3, plain PPO value
    loss, _, _ = _ppo(LossConfig(eps_clip=0.2, eps_clip_c=3.0), [2.0], [-1.0])
    assert loss.item() == pytest.approx(2.0)


def test_gspo_uses_one_geometric_mean_ratio_per_sequence() -> None:
    cfg = LossConfig(eps_clip=0.2, sequence_ratio=True)
    # token ratios 2 and 1 -> sequence ratio sqrt(2) > 1.2: clipped, loss -1.2
    loss, m, grad = _ppo(cfg, [2.0, 1.0], [1.0, 1.0])
    assert loss.item() == pytest.approx(-1.2)
    assert m["clip_frac"].item() == 1.0
    assert grad.tolist()[0] == [0.0, 0.0]
    # token ratios 1.1 and 1 -> s = sqrt(1.1); dL/dlp_j = -A * s / 2 (s is exp of the mean log-ratio)
    loss, _, grad = _ppo(cfg, [1.1, 1.0], [1.0, 1.0])
    s = math.sqrt(1.1)
    assert loss.item() == pytest.approx(-s)
    assert grad.tolist()[0] == pytest.approx([-s / 2, -s / 2])


def test_tis_weights_by_the_clipped_engine_ratio() -> None:
    lp = torch.log(_row(0.5, 0.5)).requires_grad_(True)
    mask = torch.ones(1, 2)
    # on-policy (old = current): ratio 1; tis = exp(lp - rollout) = [1/3, 4] -> clipped at 2
    loss, m = policy_loss(
        LossConfig(use_tis=True, tis_clip=2.0),
        LossInputs(
            logprobs=lp,
            advantages=_row(1.0, 1.0),
            mask=mask,
            weights=mask / 2,
            rollout_logprobs=torch.log(_row(1.5, 0.125)),
        ),
    )
    assert loss.item() == pytest.approx(-(1 / 3 + 2) / 2, abs=1e-6)
    assert m["tis"].item() == pytest.approx((1 / 3 + 4) / 2, abs=1e-5)
    assert m["tis_clip_frac"].item() == pytest.approx(0.5)
    assert m["ratio"].item() == 1.0


def test_entropy_bonus_and_kl_loss_compose() -> None:
    lp = torch.zeros(1, 2, requires_grad=True)
    mask = torch.ones(1, 2)
    cfg = LossConfig(entropy_coef=0.1, use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="k1")
    loss, m = policy_loss(
        cfg,
        LossInputs(
            logprobs=lp,
            advantages=torch.zeros(1, 2),
            mask=mask,
            weights=mask / 2,
            entropy=_row(1.0, 3.0),
            ref_logprobs=_row(-1.0, -1.0),
        ),
    )
    assert m["entropy"].item() == pytest.approx(2.0)
    assert m["kl_loss"].item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(0.0 - 0.1 * 2.0 + 0.5 * 1.0)
    # the KL term is only reported (not added) without use_kl_loss
    loss, m = policy_loss(
        LossConfig(),
        LossInputs(
            logprobs=lp, advantages=torch.zeros(1, 2), mask=mask, weights=mask / 2, ref_logprobs=_row(-1.0, -1.0)
        ),
    )
    assert loss.item() == 0.0 and m["kl_loss"].item() == pytest.approx(1.0)


def test_token_weights() -> None:
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert token_weights(mask, "token", global_tokens=8, global_samples=4).tolist() == [
        [1 / 8, 1 / 8, 1 / 8, 0.0],
        [1 / 8, 0.0, 0.0, 0.0],
    ]
    torch.testing.assert_close(
        token_weights(mask, "sample", global_tokens=8, global_samples=4),
        torch.tensor([[1 / 12, 1 / 12, 1 / 12, 0.0], [1 / 4, 0.0, 0.0, 0.0]]),
    )
    torch.testing.assert_close(
        token_weights(mask, "sample_token_sum", global_tokens=8, global_samples=4, max_response_len=10),
        torch.tensor([[1 / 40, 1 / 40, 1 / 40, 0.0], [1 / 40, 0.0, 0.0, 0.0]]),
    )


def test_aggregation_for() -> None:
    assert aggregation_for(GrpoConfig()) == "sample"
    assert aggregation_for(GrpoConfig(calculate_per_token_loss=True)) == "token"
    assert aggregation_for(GrpoConfig(advantage_estimator="dr_grpo")) == "sample_token_sum"


@pytest.mark.parametrize("mode", ["token", "sample", "sample_token_sum"])
@pytest.mark.parametrize(
    "cfg",
    [
        LossConfig(
            eps_clip=0.2,
            eps_clip_c=3.0,
            entropy_coef=0.01,
            use_kl_loss=True,
            kl_loss_coef=0.1,
            kl_loss_type="low_var_kl",
        ),
        LossConfig(sequence_ratio=True, use_tis=True),
    ],
    ids=["ppo", "gspo_tis"],
)
def test_micro_batches_and_ranks_add_up_to_the_whole_batch(mode: str, cfg: LossConfig) -> None:
    """Splitting a global batch into micro-batches (and DP ranks) gives the same loss and gradient."""
    g = torch.Generator().manual_seed(0)
    lens = [3, 1, 5, 2, 4, 2]
    leaves = [torch.randn(n, generator=g).mul(0.3).sub(1.0).requires_grad_(True) for n in lens]
    old = [torch.randn(n, generator=g).mul(0.3).sub(1.0) for n in lens]
    ref = [torch.randn(n, generator=g).mul(0.3).sub(1.0) for n in lens]
    roll = [torch.randn(n, generator=g).mul(0.3).sub(1.0) for n in lens]
    ent = [torch.rand(n, generator=g) for n in lens]
    adv = [torch.full((n,), float(a)) for n, a in zip(lens, [1.0, -1.0, 0.5, -2.0, 1.5, -0.5], strict=True)]
    total_tokens = float(sum(lens))

    def pad(ts: list[torch.Tensor], idx: list[int]) -> torch.Tensor:
        R = max(lens[i] for i in idx)
        return torch.stack([torch.nn.functional.pad(ts[i], (0, R - lens[i])) for i in idx])

    def run(split: list[list[int]]) -> tuple[float, list[torch.Tensor]]:
        for leaf in leaves:
            leaf.grad = None
        total = 0.0
        for idx in split:
            mask = pad([torch.ones(n) for n in lens], idx)
            w = token_weights(
                mask,
                mode,
                global_tokens=total_tokens,
                global_samples=len(lens),  # type: ignore[arg-type]
                max_response_len=8,
            )
            loss, _ = policy_loss(
                cfg,
                LossInputs(
                    logprobs=pad(leaves, idx),
                    old_logprobs=pad(old, idx),
                    advantages=pad(adv, idx),
                    mask=mask,
                    weights=w,
                    entropy=pad(ent, idx),
                    ref_logprobs=pad(ref, idx),
                    rollout_logprobs=pad(roll, idx),
                ),
            )
            loss.backward()
            total += loss.item()
        return total, [leaf.grad.clone() for leaf in leaves]  # type: ignore[union-attr]

    whole_loss, whole_grad = run([list(range(6))])
    for split in ([[0], [1], [2], [3], [4], [5]], [[0, 1, 2], [3, 4, 5]], [[4, 0], [2], [5, 1, 3]]):
        loss, grad = run(split)
        assert loss == pytest.approx(whole_loss, abs=1e-6)
        for a, b in zip(grad, whole_grad, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
