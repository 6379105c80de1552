"""Advantage estimators against values worked out by hand."""

from __future__ import annotations

import math
import typing

import pytest
import torch

from miles.algo.advantages import ESTIMATORS, AdvantageInputs, compute_advantages, masked_whiten
from miles.spec.tables import GrpoConfig


def _inp(rewards: list[float], groups: list[int], lens: list[int], **kw: object) -> AdvantageInputs:
    return AdvantageInputs(
        rewards=torch.tensor(rewards),
        group_index=groups,
        loss_masks=[torch.ones(n) for n in lens],
        **kw,  # type: ignore[arg-type]
    )


def _close(got: list[torch.Tensor], want: list[list[float]], tol: float = 1e-6) -> None:
    assert [g.tolist() for g in got] == [pytest.approx(w, abs=tol) for w in want]


def test_registry_covers_every_estimator_the_spec_allows() -> None:
    allowed = typing.get_args(typing.get_type_hints(GrpoConfig)["advantage_estimator"])
    assert set(ESTIMATORS) == set(allowed)


def test_grpo_normalises_by_group_mean_and_unbiased_std() -> None:
    # group 0: rewards 1,0,0,1 -> mean .5, unbiased std sqrt(1/3); group 1: 2,4 -> mean 3, std sqrt(2)
    adv = compute_advantages(GrpoConfig(), _inp([1, 0, 0, 1, 2, 4], [0, 0, 0, 0, 1, 1], [2, 1, 1, 3, 1, 2]))
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    b = 1.0 / (math.sqrt(2) + 1e-6)
    _close(adv, [[a, a], [-a], [-a], [a, a, a], [-b], [b, b]])


def test_grpo_without_std_and_dr_grpo_only_centre() -> None:
    inp = _inp([1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1])
    _close(compute_advantages(GrpoConfig(disable_grpo_std_normalization=True), inp), [[0.5], [-0.5], [-0.5], [0.5]])
    _close(compute_advantages(GrpoConfig(advantage_estimator="dr_grpo"), inp), [[0.5], [-0.5], [-0.5], [0.5]])


def test_gspo_shares_grpo_advantages_and_singleton_groups_get_zero() -> None:
    inp = _inp([3, 1, 7], [0, 0, 1], [1, 1, 2])
    a = 1.0 / (math.sqrt(2) + 1e-6)
    _close(compute_advantages(GrpoConfig(advantage_estimator="gspo"), inp), [[a], [-a], [0.0, 0.0]])


def test_advantages_are_zero_on_masked_tokens() -> None:
    inp = AdvantageInputs(
        rewards=torch.tensor([1.0, 0.0]),
        group_index=[0, 0],
        loss_masks=[torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0])],
    )
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    _close(compute_advantages(GrpoConfig(), inp), [[a, 0.0, a], [-a]])


def test_reinforce_plus_plus_discounts_kl_and_reward_then_whitens() -> None:
    cfg = GrpoConfig(advantage_estimator="reinforce_plus_plus", kl_coef=0.5, gamma=0.5)
    inp = _inp(
        [1, 0],
        [0, 1],
        [3, 1],
        old_logprobs=[torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.0])],
        ref_logprobs=[torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([0.0])],
    )
    # kl = old - ref = [1, 0, -1]; token rewards = -0.5*kl + reward on the last token = [-0.5, 0, 1.5]
    # returns with gamma .5: G2 = 1.5, G1 = 0.75, G0 = -0.5 + 0.375 = -0.125; sample 2: [0]
    flat = [-0.125, 0.75, 1.5, 0.0]
    mean = sum(flat) / 4  # 0.53125
    var = sum((x - mean) ** 2 for x in flat) / 4  # 0.4248046875
    s = 1 / math.sqrt(var + 1e-8)
    _close(compute_advantages(cfg, inp), [[(x - mean) * s for x in flat[:3]], [(0.0 - mean) * s]], tol=1e-5)


def test_reinforce_plus_plus_puts_the_reward_on_the_last_trained_token() -> None:
    cfg = GrpoConfig(advantage_estimator="reinforce_plus_plus", gamma=1.0)
    inp = AdvantageInputs(
        rewards=torch.tensor([2.0, 0.0]),
        group_index=[0, 1],
        loss_masks=[torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.0])],
    )
    # returns [2, 2, 0] and [0]; whitened over the 3 trained tokens [2, 2, 0]: mean 4/3, var 8/9
    s = 1 / math.sqrt(8 / 9 + 1e-8)
    _close(compute_advantages(cfg, inp), [[(2 - 4 / 3) * s, (2 - 4 / 3) * s, 0.0], [(0 - 4 / 3) * s]], tol=1e-5)


def test_reinforce_plus_plus_baseline() -> None:
    cfg = GrpoConfig(advantage_estimator="reinforce_plus_plus_baseline", kl_coef=1.0)
    inp = _inp(
        [1, 0],
        [0, 0],
        [2, 1],
        old_logprobs=[torch.tensor([0.0, 0.5]), torch.tensor([0.0])],
        ref_logprobs=[torch.tensor([0.0, 0.0]), torch.tensor([0.0])],
    )
    # centred rewards .5, -.5; minus kl (0, .5 | 0): tokens [0.5, 0.0 | -0.5]; mean 0, var 1/6
    s = 1 / math.sqrt(1 / 6 + 1e-8)
    _close(compute_advantages(cfg, inp), [[0.5 * s, 0.0], [-0.5 * s]], tol=1e-5)


def test_kl_reward_needs_logprobs() -> None:
    with pytest.raises(ValueError, match="kl_coef"):
        compute_advantages(GrpoConfig(advantage_estimator="reinforce_plus_plus", kl_coef=0.1), _inp([1], [0], [1]))


def test_normalize_advantages_whitens_grpo() -> None:
    inp = _inp([1, 0, 5, 5], [0, 0, 1, 1], [1, 3, 1, 1])
    # disable std: group 0 -> .5, -.5 (3 tokens), group 1 -> 0, 0: tokens [.5, -.5, -.5, -.5, 0, 0]
    flat = [0.5, -0.5, -0.5, -0.5, 0.0, 0.0]
    mean = sum(flat) / 6
    var = sum((x - mean) ** 2 for x in flat) / 6
    s = 1 / math.sqrt(var + 1e-8)
    w = [(x - mean) * s for x in flat]
    got = compute_advantages(GrpoConfig(disable_grpo_std_normalization=True, normalize_advantages=True), inp)
    _close(got, [[w[0]], w[1:4], [w[4]], [w[5]]], tol=1e-5)


def test_masked_whiten_ignores_masked_tokens() -> None:
    out = masked_whiten([torch.tensor([1.0, 100.0, 3.0])], [torch.tensor([1.0, 0.0, 1.0])])
    _close(out, [[-1 / math.sqrt(1 + 1e-8), 0.0, 1 / math.sqrt(1 + 1e-8)]])
