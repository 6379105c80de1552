"""Advantage estimators: from one rollout's scalar rewards to per-token advantages.

All estimators see the whole rollout at once (every trainer rank holds it), so
group statistics and batch whitening need no collectives and are identical on
every rank. Shapes: ``N`` samples, sample ``i`` has ``R_i`` response tokens;
per-token quantities are lists of ``N`` 1-D float tensors of length ``R_i``.

The estimators (``[grpo] advantage_estimator``):

* ``grpo``: ``A_i = (r_i - mean_g) / (std_g + 1e-6)`` over the sample's group
  ``g`` (unbiased std, as Miles), the same value on every token;
  ``disable_grpo_std_normalization`` drops the division.
* ``dr_grpo``: Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
  Training") removes both of GRPO's biases: no std division here, and no
  per-response length normalisation in the loss (``miles.algo.loss`` then sums
  each response's tokens and divides by the constant ``max_response_len``).
* ``gspo``: GSPO (Zheng et al. 2025) uses GRPO's advantages; its difference is
  the sequence-level importance ratio in the loss.
* ``reinforce_plus_plus``: per-token rewards ``-kl_coef * kl_t`` with the
  scalar reward added on the last response token, discounted returns
  ``G_t = r_t + gamma * G_{t+1}``, whitened over all response tokens of the batch.
* ``reinforce_plus_plus_baseline``: ``A_t = (r_i - mean_g) - kl_coef * kl_t``,
  whitened over the batch.

``kl_t = old_logprob_t - ref_logprob_t`` (the k1 estimate) is used only when
``kl_coef > 0``. ``normalize_advantages`` whitens the result of any estimator
(the REINFORCE++ ones are whitened already).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from miles.spec.tables import GrpoConfig

GROUP_STD_EPS = 1e-6
WHITEN_EPS = 1e-8


@dataclass
class AdvantageInputs:
    """What an estimator may read about one rollout."""

    rewards: torch.Tensor
    """``[N]`` float32 scalar reward per sample."""

    group_index: Sequence[int]
    """``N`` ids; samples with the same id answer the same prompt (a GRPO group)."""

    loss_masks: Sequence[torch.Tensor]
    """``N`` tensors ``[R_i]``: 1.0 on response tokens that are trained, 0.0 elsewhere."""

    old_logprobs: Sequence[torch.Tensor] | None = None
    """``N`` tensors ``[R_i]``: log-probs under the policy that sampled (needed when ``kl_coef > 0``)."""

    ref_logprobs: Sequence[torch.Tensor] | None = None
    """``N`` tensors ``[R_i]``: log-probs under the reference (needed when ``kl_coef > 0``)."""


Estimator = Callable[[AdvantageInputs, GrpoConfig], list[torch.Tensor]]


def group_centered(rewards: torch.Tensor, group_index: Sequence[int], *, divide_std: bool) -> torch.Tensor:
    """``[N]`` rewards minus their group mean, optionally divided by the group's (unbiased) std + 1e-6.

    A group of one sample has advantage 0 (its mean is itself; its std is taken as 0).
    """
    rewards = rewards.to(torch.float32)
    out = torch.zeros_like(rewards)
    ids = torch.tensor(list(group_index), dtype=torch.long)
    for g in torch.unique(ids).tolist():
        sel = ids == g
        r = rewards[sel]
        centered = r - r.mean()
        if divide_std:
            std = r.std(correction=1) if r.numel() > 1 else torch.zeros((), dtype=r.dtype)
            centered = centered / (std + GROUP_STD_EPS)
        out[sel] = centered
    return out


def masked_whiten(values: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Whiten ragged per-token values over every masked token of the batch.

    ``(x - mean) / sqrt(var + 1e-8)`` with the (biased) mean and variance over
    tokens whose mask is 1; masked-out tokens are returned as 0.
    """
    flat_v = torch.cat([v.to(torch.float32) for v in values]) if values else torch.zeros(0)
    flat_m = torch.cat([m.to(torch.float32) for m in masks]) if masks else torch.zeros(0)
    count = flat_m.sum()
    if count <= 0:
        return [torch.zeros_like(v, dtype=torch.float32) for v in values]
    mean = (flat_v * flat_m).sum() / count
    var = (((flat_v - mean) ** 2) * flat_m).sum() / count
    scale = torch.rsqrt(var + WHITEN_EPS)
    return [((v.to(torch.float32) - mean) * scale) * m.to(torch.float32) for v, m in zip(values, masks, strict=True)]


def _token_kl(inp: AdvantageInputs, cfg: GrpoConfig) -> list[torch.Tensor]:
    """Per-token k1 KL ``old - ref`` scaled by ``kl_coef``, or zeros when the KL reward is off."""
    if cfg.kl_coef == 0.0:
        return [torch.zeros_like(m, dtype=torch.float32) for m in inp.loss_masks]
    if inp.old_logprobs is None or inp.ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs old_logprobs and ref_logprobs")
    return [
        cfg.kl_coef * (o.to(torch.float32) - r.to(torch.float32))
        for o, r in zip(inp.old_logprobs, inp.ref_logprobs, strict=True)
    ]


def _broadcast(per_sample: torch.Tensor, masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [per_sample[i] * m.to(torch.float32) for i, m in enumerate(masks)]


def grpo(inp: AdvantageInputs, cfg: GrpoConfig) -> list[torch.Tensor]:
    """GRPO: group-normalised reward on every response token."""
    adv = group_centered(inp.rewards, inp.group_index, divide_std=not cfg.disable_grpo_std_normalization)
    return _broadcast(adv, inp.loss_masks)


def dr_grpo(inp: AdvantageInputs, cfg: GrpoConfig) -> list[torch.Tensor]:
    """Dr. GRPO: group-centred reward, never divided by the std."""
    return _broadcast(group_centered(inp.rewards, inp.group_index, divide_std=False), inp.loss_masks)


def reinforce_plus_plus(inp: AdvantageInputs, cfg: GrpoConfig) -> list[torch.Tensor]:
    """REINFORCE++: discounted token returns of (KL penalty + final reward), whitened over the batch."""
    kls = _token_kl(inp, cfg)
    returns: list[torch.Tensor] = []
    for i, (mask, kl) in enumerate(zip(inp.loss_masks, kls, strict=True)):
        m = mask.to(torch.float32)
        token_reward = -kl * m
        trained = torch.nonzero(m > 0).flatten()
        if trained.numel() > 0:
            token_reward[int(trained[-1])] += inp.rewards[i].to(torch.float32)
        ret = torch.zeros_like(token_reward)
        running = torch.zeros((), dtype=torch.float32)
        for t in range(token_reward.numel() - 1, -1, -1):
            running = token_reward[t] + cfg.gamma * running
            ret[t] = running
        returns.append(ret)
    return masked_whiten(returns, inp.loss_masks)


def reinforce_plus_plus_baseline(inp: AdvantageInputs, cfg: GrpoConfig) -> list[torch.Tensor]:
    """REINFORCE++-baseline: group-mean baseline minus the token KL penalty, whitened over the batch."""
    centered = group_centered(inp.rewards, inp.group_index, divide_std=False)
    kls = _token_kl(inp, cfg)
    adv = [(centered[i] - kls[i]) * m.to(torch.float32) for i, m in enumerate(inp.loss_masks)]
    return masked_whiten(adv, inp.loss_masks)


ESTIMATORS: dict[str, Estimator] = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "gspo": grpo,
    "reinforce_plus_plus": reinforce_plus_plus,
    "reinforce_plus_plus_baseline": reinforce_plus_plus_baseline,
}
"""``[grpo] advantage_estimator`` -> estimator. GSPO shares GRPO's advantages (its change is in the loss)."""


def compute_advantages(cfg: GrpoConfig, inp: AdvantageInputs) -> list[torch.Tensor]:
    """Per-token advantages ``[R_i]`` for every sample, with ``normalize_advantages`` applied."""
    try:
        estimator = ESTIMATORS[cfg.advantage_estimator]
    except KeyError:
        raise ValueError(
            f"unknown advantage_estimator {cfg.advantage_estimator!r}; choose from {sorted(ESTIMATORS)}"
        ) from None
    adv = estimator(inp, cfg)
    if cfg.normalize_advantages and cfg.advantage_estimator not in (
        "reinforce_plus_plus",
        "reinforce_plus_plus_baseline",
    ):
        adv = masked_whiten(adv, inp.loss_masks)
    return adv
