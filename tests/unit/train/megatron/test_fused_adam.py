"""``[perf] fused_kernels`` steps the AdamW inside Megatron's optimizer with torch's fused kernel."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from miles.train.megatron.actor import _fuse_adam


def _adamw(fused: bool | None = None) -> torch.optim.AdamW:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(3))]
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused)


def _step(opt: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=gen)
    opt.step()


def test_a_foreach_adamw_continues_as_the_fused_kernel_would() -> None:
    # Megatron's ChainedOptimizer holds optimizers, each wrapping torch's AdamW as `.optimizer`.
    switched, fused = _adamw(), _adamw(fused=True)
    _step(switched, 1)  # one foreach step first: its step counters sit on the host, as a foreach checkpoint's do
    _step(fused, 1)
    _fuse_adam(SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=switched)]))
    assert all(g["fused"] and not g["foreach"] for g in switched.param_groups)
    for seed in (2, 3, 4):
        _step(switched, seed)
        _step(fused, seed)
    for a, b in zip(switched.param_groups[0]["params"], fused.param_groups[0]["params"], strict=True):
        # The two kernels order the update's arithmetic differently, so each of the 4 steps may round a weight to
        # a neighbouring float: at most about one ulp of the weight per step (2 eps |w|), with 2x for |w| growing.
        bound = 4 * 2 * torch.finfo(torch.float32).eps * float(b.abs().max()) * 2
        torch.testing.assert_close(a, b, rtol=0, atol=bound)
    assert all(s["step"].dtype == torch.float32 for s in switched.state.values())


def test_an_optimizer_that_is_not_adam_is_left_alone() -> None:
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    _fuse_adam(SimpleNamespace(optimizer=sgd))
    assert "fused" not in sgd.param_groups[0] or not sgd.param_groups[0]["fused"]
