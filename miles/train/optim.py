"""AdamW and the learning-rate schedule of ``[optimizer]``, shared by the training backends.

The schedule is a pure function of the optimizer step, so a checkpoint only
needs the step counter to resume it exactly (no scheduler object to pickle).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from miles.spec.tables import OptimizerConfig


def lr_at(cfg: OptimizerConfig, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Warm-up is linear from ``lr / lr_warmup_iters`` at step 0 to ``lr`` at step
    ``lr_warmup_iters - 1`` (the first step already learns, unlike Megatron's
    which starts at 0). Then ``constant`` keeps ``lr``; ``linear`` and ``cosine``
    decay from ``lr`` to ``min_lr`` over the steps up to ``lr_decay_iters``
    (default: ``total_steps``) and stay at ``min_lr`` after.
    """
    warm = cfg.lr_warmup_iters
    if warm > 0 and step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    decay_end = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else total_steps
    span = max(decay_end - warm, 1)
    ratio = min(max((step - warm) / span, 0.0), 1.0)
    if cfg.lr_decay_style == "linear":
        coeff = 1.0 - ratio
    else:
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * coeff


def build_adamw(cfg: OptimizerConfig, named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices only.

    Biases and norm weights (1-D parameters) get no weight decay, as in
    Megatron and Miles: decaying a norm's scale towards 0 is not regularisation.
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
