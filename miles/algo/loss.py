"""The policy loss: PPO clipping (clip-higher, dual clip), GSPO, TIS, KL and entropy terms.

Shapes: a micro-batch of ``B`` samples padded to ``R`` response tokens; every
per-token tensor is ``[B, R]`` float32 and padding has mask 0.

Aggregation is a per-token weight matrix ``w`` (:func:`token_weights`) whose
normaliser is the count over the *global* batch (all micro-batches, all DP
ranks), so ``loss = sum(w * per_token_loss)`` of every micro-batch adds up to
exactly the loss of the whole batch: gradient accumulation and data
parallelism give the same gradient as one big batch (up to float summation
order). The three modes:

* ``token`` (``calculate_per_token_loss``): ``w = mask / tokens_in_global_batch``;
* ``sample`` (Miles' default): ``w = mask / (tokens_of_sample * samples_in_global_batch)``,
  i.e. mean over each sample's tokens, then mean over samples;
* ``sample_token_sum`` (Dr. GRPO): ``w = mask / (max_response_len * samples_in_global_batch)``,
  a per-sample token *sum* over a constant, which removes GRPO's length bias.

Metrics come back as the same weighted sums (so they add up across
micro-batches and ranks to global means) except ``*_max`` / ``*_min``, which
reduce with max / min.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from miles.spec.tables import GrpoConfig

KlType = Literal["k1", "k2", "k3", "low_var_kl"]
Aggregation = Literal["token", "sample", "sample_token_sum"]
LOW_VAR_KL_BOUND = 10.0


def logprobs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``targets`` and the entropy of the distribution, in float32.

    ``logits`` ``[..., V]`` (any dtype) are divided by the sampling
    ``temperature`` (as Miles does, so the trained policy is the one the engine
    sampled from); ``targets`` ``[...]`` int64. Returns two ``[...]`` tensors.
    """
    logits = logits.to(torch.float32)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = torch.gather(logp_all, -1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KlType) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs (Schulman's k1/k2/k3).

    With ``d = logprobs - ref_logprobs``: k1 = ``d``; k2 = ``d**2 / 2``;
    k3 = ``exp(-d) - 1 + d`` (unbiased, always >= 0); low_var_kl = k3 clamped to
    ``[-10, 10]`` (as verl and Miles do, against rare huge ratios).
    """
    d = logprobs.to(torch.float32) - ref_logprobs.to(torch.float32)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind in ("k3", "low_var_kl"):
        k3 = torch.exp(-d) - 1.0 + d
        return k3.clamp(-LOW_VAR_KL_BOUND, LOW_VAR_KL_BOUND) if kind == "low_var_kl" else k3
    raise ValueError(f"unknown kl_loss_type {kind!r}")


def aggregation_for(cfg: GrpoConfig) -> Aggregation:
    """The aggregation mode that the spec selects (see the module docstring)."""
    if cfg.calculate_per_token_loss:
        return "token"
    return "sample_token_sum" if cfg.advantage_estimator == "dr_grpo" else "sample"


def token_weights(
    mask: torch.Tensor,
    mode: Aggregation,
    *,
    global_tokens: float,
    global_samples: int,
    max_response_len: int | None = None,
) -> torch.Tensor:
    """``[B, R]`` weights that turn per-token losses into this micro-batch's share of the global loss.

    ``global_tokens`` is the sum of the mask over the whole global batch (all
    ranks, all micro-batches), ``global_samples`` its number of samples.
    """
    mask = mask.to(torch.float32)
    if mode == "token":
        return mask / max(float(global_tokens), 1.0)
    if mode == "sample":
        per_sample = mask.sum(-1, keepdim=True).clamp(min=1.0)
        return mask / (per_sample * max(global_samples, 1))
    if mode == "sample_token_sum":
        if not max_response_len:
            raise ValueError("sample_token_sum aggregation needs max_response_len")
        return mask / (float(max_response_len) * max(global_samples, 1))
    raise ValueError(f"unknown aggregation {mode!r}")


@dataclass(frozen=True)
class LossConfig:
    """The loss knobs of ``[grpo]``, flattened for the loss function."""

    eps_clip: float = 0.2
    eps_clip_high: float | None = None
    eps_clip_c: float | None = None
    sequence_ratio: bool = False
    """GSPO: one importance ratio per sequence, ``exp(mean_t(logp - old_logp))``."""
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.0
    kl_loss_type: KlType = "k1"
    entropy_coef: float = 0.0
    use_tis: bool = False
    tis_clip: float = 2.0

    @classmethod
    def from_grpo(cls, cfg: GrpoConfig) -> LossConfig:
        return cls(
            eps_clip=cfg.eps_clip,
            eps_clip_high=cfg.eps_clip_high,
            eps_clip_c=cfg.eps_clip_c,
            sequence_ratio=cfg.advantage_estimator == "gspo",
            use_kl_loss=cfg.use_kl_loss,
            kl_loss_coef=cfg.kl_loss_coef,
            kl_loss_type=cfg.kl_loss_type,
            entropy_coef=cfg.entropy_coef,
            use_tis=cfg.use_tis,
            tis_clip=cfg.tis_clip,
        )


@dataclass
class LossInputs:
    """One micro-batch, all ``[B, R]`` float32 (``logprobs`` with grad)."""

    logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor
    """From :func:`token_weights`; zero wherever ``mask`` is zero."""
    old_logprobs: torch.Tensor | None = None
    """``None``: on-policy, the detached current log-probs are the old ones (ratio 1, gradient of plain PG)."""
    entropy: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    rollout_logprobs: torch.Tensor | None = None
    """The engine's log-probs, for TIS."""


def policy_loss(cfg: LossConfig, inp: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the loss and its (detached) metric sums.

    ``loss = sum(w * (pg - entropy_coef * entropy + kl_loss_coef * kl))`` where
    ``pg = max(-A * ratio, -A * clip(ratio, 1 - eps_clip, 1 + eps_clip_high))``
    and, with dual clip, ``pg = min(pg, -A * eps_clip_c)`` where ``A < 0``;
    with TIS ``pg`` is multiplied by ``min(exp(old - rollout), tis_clip)`` (no grad).
    """
    lp = inp.logprobs
    mask = inp.mask.to(torch.float32)
    w = inp.weights
    adv = inp.advantages.to(torch.float32)
    old = lp.detach() if inp.old_logprobs is None else inp.old_logprobs.to(torch.float32)

    log_ratio = lp - old
    if cfg.sequence_ratio:
        seq = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        log_ratio = seq.expand_as(lp)
    ratio = torch.exp(log_ratio)
    high = cfg.eps_clip_high if cfg.eps_clip_high is not None else cfg.eps_clip
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - cfg.eps_clip, 1.0 + high)
    pg = torch.maximum(pg1, pg2)
    clipped = (pg2 > pg1).to(torch.float32)
    dual_clipped = torch.zeros_like(mask)
    if cfg.eps_clip_c is not None:
        pg3 = -adv * cfg.eps_clip_c
        dual_clipped = ((pg > pg3) & (adv < 0)).to(torch.float32)
        pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)

    metrics: dict[str, torch.Tensor] = {}
    if cfg.use_tis:
        if inp.rollout_logprobs is None:
            raise ValueError("use_tis needs the engine's rollout log-probs")
        tis = torch.exp(old - inp.rollout_logprobs.to(torch.float32)).detach()
        tis_w = tis.clamp(max=cfg.tis_clip)
        pg = pg * tis_w
        metrics["tis"] = (w * tis).sum().detach()
        metrics["tis_clip_frac"] = (w * (tis > cfg.tis_clip).to(torch.float32)).sum()

    pg_loss = (w * pg).sum()
    loss = pg_loss
    if inp.entropy is not None:
        ent = (w * inp.entropy).sum()
        metrics["entropy"] = ent.detach()
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * ent
    if inp.ref_logprobs is not None:
        kl = (w * kl_penalty(lp, inp.ref_logprobs, cfg.kl_loss_type)).sum()
        metrics["kl_loss"] = kl.detach()
        if cfg.use_kl_loss:
            loss = loss + cfg.kl_loss_coef * kl

    with torch.no_grad():
        valid = mask > 0
        inf = torch.full((), float("inf"), device=lp.device)
        metrics["pg_loss"] = pg_loss.detach()
        metrics["clip_frac"] = (w * clipped).sum()
        metrics["dual_clip_frac"] = (w * dual_clipped).sum()
        metrics["ppo_kl"] = (w * (old - lp.detach())).sum()
        metrics["ratio"] = (w * ratio.detach()).sum()
        metrics["ratio_max"] = torch.where(valid, ratio.detach(), -inf).max()
        metrics["ratio_min"] = torch.where(valid, ratio.detach(), inf).min()
        metrics["loss"] = loss.detach()
    return loss, metrics
