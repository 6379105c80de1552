"""SGLang's sampling parameters, parsed and checked the way the embedded engine uses them.

The embedded engine accepts exactly the ``sampling_params`` JSON object of
SGLang's ``/generate`` (``sglang/srt/sampling/sampling_params.py``), so one
request body drives either engine. Keys SGLang knows but the embedded engine
does not implement (penalties, grammars, ``min_p`` ...) are accepted only at
their SGLang default: a request that relies on them fails loudly instead of
silently sampling from a different distribution. Unknown keys are rejected,
as SGLang rejects them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

GREEDY_EPS = 1e-6
"""Temperatures below this are greedy, as in SGLang (which turns them into top_k=1, temperature 1)."""

SUPPORTED_KEYS = frozenset(
    {
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "skip_special_tokens",
        "no_stop_trim",
        "sampling_seed",
        "n",
        "min_new_tokens",
    }
)
"""SGLang sampling keys the embedded engine implements."""

DEFAULT_ONLY_KEYS: dict[str, Any] = {
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "beam_width": None,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "stop_regex": None,
    "logit_bias": None,
    "custom_params": None,
    "stream_interval": None,
    "spaces_between_special_tokens": True,
}
"""SGLang sampling keys accepted only at SGLang's default value (or null)."""


class SamplingError(ValueError):
    """A ``sampling_params`` object the engine cannot honour; the server answers 400 with this message."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling parameters, named and defaulted as in SGLang 0.5.20."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 (SGLang's "whole vocabulary") disables top-k."""
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None
    """Seed of this request's own generator: same request + same seed + same weights -> same tokens."""
    n: int = 1
    min_new_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    @classmethod
    def from_json(cls, body: dict[str, Any] | None) -> SamplingParams:
        """Parse SGLang's ``sampling_params`` object; ``null`` values mean the default, as in SGLang."""
        if body is None:
            return cls()
        if not isinstance(body, dict):
            raise SamplingError(f"sampling_params must be an object, got {type(body).__name__}")
        unknown = sorted(set(body) - SUPPORTED_KEYS - set(DEFAULT_ONLY_KEYS))
        if unknown:
            raise SamplingError(f"unknown sampling_params keys {unknown}")
        for key, default in DEFAULT_ONLY_KEYS.items():
            value = body.get(key)
            if value is not None and value != default and value not in ([], "", {}):
                raise SamplingError(
                    f"sampling_params.{key}={value!r} is not supported by the embedded engine "
                    f'(only SGLang\'s default {default!r}); use engine = "sglang" for it'
                )
        kw: dict[str, Any] = {k: v for k, v in body.items() if k in SUPPORTED_KEYS and v is not None}
        stop = kw.get("stop", ())
        kw["stop"] = (stop,) if isinstance(stop, str) else tuple(str(s) for s in stop)
        kw["stop_token_ids"] = tuple(int(t) for t in kw.get("stop_token_ids", ()))
        if "top_k" in kw and int(kw["top_k"]) >= 1 << 30:
            kw["top_k"] = -1
        try:
            params = cls(**kw)
            params = cls(
                max_new_tokens=int(params.max_new_tokens),
                temperature=float(params.temperature),
                top_p=float(params.top_p),
                top_k=int(params.top_k),
                stop=params.stop,
                stop_token_ids=params.stop_token_ids,
                ignore_eos=bool(params.ignore_eos),
                skip_special_tokens=bool(params.skip_special_tokens),
                no_stop_trim=bool(params.no_stop_trim),
                sampling_seed=None if params.sampling_seed is None else int(params.sampling_seed),
                n=int(params.n),
                min_new_tokens=int(params.min_new_tokens),
            )
        except (TypeError, ValueError) as e:
            raise SamplingError(f"bad sampling_params: {e}") from e
        params.verify()
        return params

    def verify(self) -> None:
        """SGLang's own range checks, with its messages."""
        if not math.isfinite(self.temperature) or self.temperature < 0.0:
            raise SamplingError(f"temperature must be a non-negative finite number, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 1 and self.top_k != -1:
            raise SamplingError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        if self.max_new_tokens < 0:
            raise SamplingError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise SamplingError(
                f"min_new_tokens must be in [0, max_new_tokens({self.max_new_tokens})], got {self.min_new_tokens}."
            )
        if self.n < 1:
            raise SamplingError(f"n must be at least 1, got {self.n}.")


# ---------------------------------------------------------------------------- batched sampling on the device


@dataclass
class BatchSampling:
    """One batch's sampling parameters as per-row tensors, so that a decode step samples every row at once.

    Building these once per batch (instead of reading ``SamplingParams`` per row and per token) is what lets a
    decode step run without a single host synchronisation, and so be captured in a CUDA graph. ``draws`` holds
    every uniform number a row may need, drawn up front from the row's own seeded ``torch.Generator``: the draw
    of a row's k-th token is the k-th number of that generator, exactly as when it was drawn token by token, so
    a row's tokens still depend only on its request, its seed and the weights.
    """

    temperature: torch.Tensor
    """float32 [n]; 1 for greedy rows (their logprobs are those of softmax(logits))."""
    greedy: torch.Tensor
    """bool [n]."""
    top_p: torch.Tensor
    """float32 [n]; 1 when off."""
    top_k: torch.Tensor
    """int64 [n]; the vocabulary size when off."""
    min_new: torch.Tensor
    """int64 [n]; the row's ``blocked`` ids get -inf while fewer than this many tokens were produced."""
    blocked: torch.Tensor
    """int64 [n, m]: ids a row may not produce before ``min_new`` (its stop ids and EOS), padded by repetition."""
    draws: torch.Tensor
    """float32 [n, steps]: the uniform number of each row's k-th token in column k."""
    needs_sort: bool
    """Some row uses top-k or top-p (the whole batch then goes through the sorted path, as in SGLang)."""
    any_sampled: bool
    """Some row is not greedy."""
    any_blocked: bool
    """Some row has ids blocked by ``min_new_tokens``."""

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        budgets: list[int],
        eos_ids: set[int],
        vocab_size: int,
        steps: int,
    ) -> BatchSampling:
        """The host-side tensors of ``params`` (copy them to the device once per batch)."""
        n = len(params)
        blocked_rows: list[list[int]] = []
        min_new: list[int] = []
        for p in params:
            ids = list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(eos_ids))
            ids = [i for i in ids if 0 <= i < vocab_size]
            blocked_rows.append(ids)
            min_new.append(p.min_new_tokens if ids else 0)  # nothing to block: never touch the row's logits
        width = max(1, max(len(b) for b in blocked_rows))
        blocked = torch.tensor(
            [(b or [0]) + [(b or [0])[0]] * (width - len(b or [0])) for b in blocked_rows], dtype=torch.long
        )
        draws = torch.zeros((n, max(1, steps)), dtype=torch.float32)
        for row, (p, seed, budget) in enumerate(zip(params, seeds, budgets, strict=True)):
            if not p.greedy and budget > 0:
                draws[row, :budget] = torch.rand(budget, generator=torch.Generator().manual_seed(seed))
        return cls(
            temperature=torch.tensor([1.0 if p.greedy else p.temperature for p in params], dtype=torch.float32),
            greedy=torch.tensor([p.greedy for p in params], dtype=torch.bool),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
            top_k=torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in params], dtype=torch.long),
            min_new=torch.tensor(min_new, dtype=torch.long),
            blocked=blocked,
            draws=draws,
            needs_sort=any(not p.greedy and (p.top_k > 0 or p.top_p < 1.0) for p in params),
            any_sampled=any(not p.greedy for p in params),
            any_blocked=any(m > 0 for m in min_new),
        )

    def to(self, device: torch.device) -> BatchSampling:
        return self.select(None, device)

    def select(self, index: torch.Tensor | None, device: torch.device | None = None) -> BatchSampling:
        """The rows ``index`` (all rows when None), on ``device``."""

        def pick(t: torch.Tensor) -> torch.Tensor:
            t = t if device is None else t.to(device)
            return t if index is None else t.index_select(0, index.to(t.device))

        return BatchSampling(
            pick(self.temperature),
            pick(self.greedy),
            pick(self.top_p),
            pick(self.top_k),
            pick(self.min_new),
            pick(self.blocked),
            pick(self.draws),
            self.needs_sort,
            self.any_sampled,
            self.any_blocked,
        )


def block_early_stops(
    logits: torch.Tensor, produced: torch.Tensor, min_new: torch.Tensor, blocked: torch.Tensor
) -> None:
    """In place: a row's blocked ids get -inf while it has produced fewer than ``min_new`` tokens.

    ``produced`` is a one-element tensor (the step), so no host value is read: the same kernels serve every step.
    """
    values = logits.gather(1, blocked)
    early = (produced < min_new).unsqueeze(1)
    logits.scatter_(1, blocked, torch.where(early, torch.full_like(values, float("-inf")), values))


@functools.lru_cache(maxsize=64)
def cdf_block(vocab: int) -> int:
    """Block size of the two-level inverse CDF: the divisor of ``vocab`` in [16, 4096] nearest its square root.

    0 when there is none (a small or prime vocabulary): the whole row is then scanned at once.
    """
    best = 0
    for d in range(16, min(4096, vocab // 2) + 1):
        if vocab % d == 0 and (best == 0 or abs(d * d - vocab) < abs(best * best - vocab)):
            best = d
    return best


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor, block: int) -> torch.Tensor:
    """Index [n, 1] of the first slot whose cumulative mass reaches ``u * total`` in each row of ``probs``.

    With ``block`` > 0 it sums blocks, finds the block holding the target, then scans only that block: one
    read of the row instead of a full scan that reads and writes it (a 152k-token vocabulary at batch 256 makes
    the full scan the largest kernel of a decode step). Both are exact up to float rounding at the boundaries.
    """
    n, vocab = probs.shape
    if not block:
        cdf = probs.cumsum(-1)
        return torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)).clamp(max=vocab - 1)
    blocks = probs.view(n, vocab // block, block)
    sums = blocks.sum(-1)
    outer = sums.cumsum(-1)
    target = (u.to(outer.dtype) * outer[:, -1]).unsqueeze(1)
    bi = torch.searchsorted(outer, target).clamp(max=vocab // block - 1)
    before = outer.gather(1, bi) - sums.gather(1, bi)
    inner = blocks.gather(1, bi.unsqueeze(-1).expand(n, 1, block)).view(n, block).cumsum(-1) + before
    return bi * block + torch.searchsorted(inner, target).clamp(max=block - 1)


def sample_batch(
    logits: torch.Tensor, u: torch.Tensor, s: BatchSampling, scaled: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its logprob, SGLang's way, with no host synchronisation.

    ``logits``: float32 [n, vocab] (the rows of ``s``), already divided by each row's temperature when
    ``scaled``, else of any float dtype (converted to float32 before the division); ``u``: float32 [n], each
    row's uniform draw. Greedy rows take the argmax. Sampled rows draw from
    softmax(logits / T), after top_p then top_k on the sorted distribution when any row asks for them, by inverse
    CDF with their draw (scaled by the kept mass, so no renormalisation). The logprob is log softmax(logits / T)
    of the chosen token over the whole vocabulary (T = 1 for greedy rows), before top-k/top-p: what SGLang 0.5.20
    returns by default.
    """
    vocab = logits.shape[1]
    logprobs = torch.log_softmax(logits if scaled else logits.float() / s.temperature.unsqueeze(1), dim=-1)
    tokens = torch.argmax(logits, dim=-1)
    if s.any_sampled:
        probs = logprobs.exp()
        if s.needs_sort:
            probs, order = probs.sort(dim=-1, descending=True)
            before = probs.cumsum(-1) - probs
            rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
            probs = probs.masked_fill((before > s.top_p.unsqueeze(1)) | (rank >= s.top_k.unsqueeze(1)), 0.0)
            pick = _inverse_cdf(probs, u, 0)
            # never land on a zero-probability slot through float ties: fall back to the most likely token
            pick = torch.where(probs.gather(1, pick) > 0, pick, torch.zeros_like(pick))
            chosen = order.gather(1, pick).view(-1)
        else:
            pick = _inverse_cdf(probs, u, cdf_block(vocab))
            chosen = torch.where(probs.gather(1, pick) > 0, pick, tokens.view(-1, 1)).view(-1)
        tokens = torch.where(s.greedy, tokens, chosen)
    return tokens, logprobs.gather(1, tokens.view(-1, 1)).view(-1)
