"""The decode step's elementwise chains, fused by ``torch.compile`` (Triton) on CUDA.

A decode step of the static path (:mod:`miles.engine.decoder`) at batch 256
spends about a quarter of its GPU time in some 300 elementwise kernels of a
few microseconds each: per layer the residual add and the RMSNorm after it
(twice), RoPE's multiply, roll and multiply-add, and SiLU times up. Inductor
fuses each chain into one kernel (the add and the norm that reads it into one
pass, RoPE into one pass over q and k), and the sampling of
:func:`~miles.engine.sampling.sample_batch` into a few reductions over the
vocabulary. The compiled kernels are ordinary CUDA launches, so the decoder's
CUDA graphs capture them like the rest of the step.

:class:`Fusion` holds the compiled functions, or the same functions eager when
fusing is off or impossible (no CUDA, no Triton). Shapes that change between
graph keys (the batch bucket) trigger one recompile with dynamic sizes, then
none (``dynamic=None``: torch's automatic dynamic shapes).

The fused results may differ from the eager ones in the last bit of a bf16
value (the norm reads the float32 sum instead of its bf16 rounding, as fused
norms in inference engines do); the tokens' logprobs still come from the one
forward the tokens were sampled from.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from miles.engine.sampling import BatchSampling, sample_batch


def add_rms_norm(
    h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, RMSNorm(h + delta) * weight): a residual add and the pre-norm of the next sublayer."""
    total = h + delta
    return total, F.rms_norm(total, (total.shape[-1],), weight, eps)


def rope(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's ``q * cos + rotate_half(q) * sin`` with rotate_half's sign folded into ``sin`` (the decoder's tables)."""
    return torch.addcmul(qk * cos, torch.roll(qk, qk.shape[-1] // 2, dims=-1), sin)


def rope_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    pos: torch.Tensor,
    n_heads: int,
) -> torch.Tensor:
    """RoPE on one decode step's q and k (``qkv`` [b, 1, heads + 2 kv_heads, d]), k and v written at each row's
    slot ``pos`` of its cache row ``rows`` (caches [rows, kv_heads, length, d]); returns q [b, 1, heads, d]."""
    n_kv = (qkv.shape[2] - n_heads) // 2
    qk = rope(qkv[:, :, : n_heads + n_kv], cos, sin)
    k_cache[rows, :, pos] = qk[:, 0, n_heads:]
    v_cache[rows, :, pos] = qkv[:, 0, n_heads + n_kv :]
    return qk[:, :, :n_heads]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of the packed gate/up projection's output."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def norm_args(module: Any) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of an HF RMSNorm module (``F.rms_norm`` computes it as HF does); None for other norms."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None or "RMSNorm" not in type(module).__name__:
        return None
    return module.weight, float(eps)


def rms_args(module: Any) -> tuple[torch.Tensor, float]:
    """:func:`norm_args` of a norm known to be an RMSNorm (one :func:`fusable` checked)."""
    args = norm_args(module)
    assert args is not None, f"{type(module).__name__} is not an RMSNorm"
    return args


def fusable(model: Any, packs: list[list[torch.Tensor | None]] | None) -> bool:
    """Whether a decoder's layers can take the fused forward: packed q/k/v and gate/up weights (``packs``),
    RMSNorms and SiLU-gated MLPs."""
    inner = model.model
    if packs is None or any(len(p) < 4 or p[2] is None for p in packs) or norm_args(inner.norm) is None:
        return False
    return all(
        norm_args(layer.input_layernorm) is not None
        and norm_args(layer.post_attention_layernorm) is not None
        and type(getattr(layer.mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
        for layer in inner.layers
    )


def available(device: torch.device) -> str | None:
    """Why fusing cannot run on ``device`` (None when it can)."""
    if device.type != "cuda":
        return f"fusing compiles Triton kernels for CUDA; the engine runs on {device.type}"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (torch.compile's CUDA backend needs it)"
    return None


class Fusion:
    """The decode step's fusable functions: compiled (``on``) or eager."""

    def __init__(self, on: bool) -> None:
        self.on = on
        wrap: Callable[[Any], Any] = (lambda f: torch.compile(f, dynamic=None, fullgraph=True)) if on else (lambda f: f)
        self.add_rms_norm = wrap(add_rms_norm)
        self.rope = wrap(rope)
        self.rope_store = wrap(rope_store)
        self.silu_mul = wrap(silu_mul)
        # not fullgraph: the sampling flags (Python bools of the batch) pick branches
        self._sample_compiled = torch.compile(sample_batch, dynamic=None) if on else sample_batch

    def sample(
        self, logits: torch.Tensor, u: torch.Tensor, s: BatchSampling, scaled: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`sample_batch`, compiled unless a row asks for top-k/top-p. That path sorts the vocabulary, which
        fusing cannot speed up, and Inductor fails to generate the cumulative sum over the sorted vocabulary once
        the batch size turns dynamic (torch 2.11 on an H200), so it runs eagerly, inside the same CUDA graph."""
        if s.needs_sort:
            return sample_batch(logits, u, s, scaled=scaled)
        return self._sample_compiled(logits, u, s, scaled=scaled)  # type: ignore[no-any-return]

    @classmethod
    def for_device(cls, device: torch.device, want: bool | None = None) -> Fusion:
        """``want`` None: fuse when it can run here; True: fuse or raise naming why not; False: eager."""
        why_not = available(device)
        if want and why_not:
            raise RuntimeError(f"cannot fuse the decode step: {why_not}")
        return cls(on=bool(want if want is not None else why_not is None))
