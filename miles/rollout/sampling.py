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

import math
from dataclasses import dataclass
from typing import Any

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
                    f"(only SGLang's default {default!r}); use engine = \"sglang\" for it"
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
