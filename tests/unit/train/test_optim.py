"""The learning-rate schedule and AdamW's parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from miles.spec.tables import OptimizerConfig
from miles.train.optim import build_adamw, lr_at


def test_constant_with_warmup() -> None:
    cfg = OptimizerConfig(lr=1.0, lr_warmup_iters=4)
    assert [lr_at(cfg, s, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(OptimizerConfig(lr=0.5), 0, 10) == 0.5


def test_linear_decay_to_min_lr() -> None:
    cfg = OptimizerConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=2, lr_decay_style="linear")
    # decay over steps 2..12 (total 12): halfway at step 7
    assert lr_at(cfg, 0, 12) == 0.5
    assert lr_at(cfg, 2, 12) == 1.0
    assert lr_at(cfg, 7, 12) == pytest.approx(0.55)
    assert lr_at(cfg, 12, 12) == pytest.approx(0.1)
    assert lr_at(cfg, 50, 12) == pytest.approx(0.1)


def test_cosine_decay_and_explicit_decay_iters() -> None:
    cfg = OptimizerConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=2, lr_decay_style="cosine")
    assert lr_at(cfg, 7, 12) == pytest.approx(0.55)
    assert lr_at(cfg, 4, 12) == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(0.2 * math.pi) + 1))
    fixed = OptimizerConfig(lr=1.0, lr_decay_style="cosine", lr_decay_iters=10)
    assert lr_at(fixed, 5, 1000) == pytest.approx(0.5)
    assert lr_at(fixed, 10, 1000) == pytest.approx(0.0)


def test_adamw_decays_matrices_only() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = build_adamw(
        OptimizerConfig(weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.9, adam_eps=1e-6), model.named_parameters()
    )
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # linear bias, norm weight and bias
    assert decay["betas"] == (0.8, 0.9) and decay["eps"] == 1e-6
