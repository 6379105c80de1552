"""RMSNorm for Megatron's local layer spec: torch's fused kernel, weights in the model dtype.

Without apex or Transformer Engine, Megatron's local spec builds its norms as
``torch.nn.RMSNorm`` with float32 weights inside a bf16 model. torch's fused
``rms_norm`` kernel needs the input and weight dtypes to match, so every norm
of such a model falls back to the composite path (upcast, square, mean,
rsqrt, two multiplies, a cast: about eight kernels forward and more backward,
each a pass over the ``[tokens, hidden]`` activations). This module keeps the
weight in ``config.params_dtype``, as HF checkpoints store it (bf16 weights
multiply bf16 normalised activations in HF's Llama/Qwen norms too), so the
fused kernel runs; its statistics are still computed in float32. The master
copy the optimizer updates stays float32 (Megatron's mixed-precision
optimizer keeps one for every bf16 parameter). The parameter is named
``weight`` like torch's, so checkpoints and the HF mapping are unchanged.
Selected by ``[perf] fused_kernels = true``.

It is also the norm of sequence parallelism on the local spec (Megatron's
torch norms refuse ``sequence_parallel``): there each TP rank normalises its
own slice of the tokens, so its weight gradient is a partial sum, and the
``sequence_parallel`` tag makes Megatron's gradient finalisation all-reduce
it over the TP group, as Transformer Engine's norms are treated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F


class RMSNorm(torch.nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension, with the builder signature Megatron's
    specs use.
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__()
        self.eps = eps
        self.shape = (hidden_size,)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # read by Megatron's gradient finalisation: sum the weight's gradient over TP under sequence parallelism
        self.weight.sequence_parallel = bool(getattr(config, "sequence_parallel", False))  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.shape, self.weight, self.eps)
