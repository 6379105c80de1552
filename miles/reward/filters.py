"""Dynamic-sampling filters: which scored groups of a rollout carry a training signal.

GRPO learns from the differences between the ``n`` responses to one prompt. A
group whose rewards are all equal (every answer right, or every answer wrong)
has zero advantage everywhere and only dilutes the batch; DAPO's dynamic
sampling drops such groups and samples more prompts until the batch is full
(:mod:`miles.rollout.oversample`). ``[rollout] dynamic_sampling_filter_path``
names the filter:

* ``miles.reward.filters:check_reward_nonzero_std``, the built-in zero-variance
  rule (Miles' ``filter_hub.dynamic_sampling_filters.check_reward_nonzero_std``
  is accepted as an alias of it);
* any ``module:function`` (or ``file.py:function``) with Miles' signature
  ``f(args, samples, **kwargs)``: ``args`` is the ``[rollout]`` table, ``samples``
  the scored samples of one prompt, and the result either a bool or an object
  with ``keep`` (and optionally ``reason``), like Miles' ``DynamicFilterOutput``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miles.errors import UserError
from miles.reward.custom import load_function
from miles.sample import Sample

BUILTIN = "miles.reward.filters:check_reward_nonzero_std"

ALIASES = {
    "miles.rollout.filter_hub.dynamic_sampling_filters:check_reward_nonzero_std": BUILTIN,
    "miles.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std": BUILTIN,
    "slime.rollout.filter_hub.dynamic_sampling_filters:check_reward_nonzero_std": BUILTIN,
    "slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std": BUILTIN,
}
"""Miles' and slime's names of the zero-variance filter (their package is not installed here)."""


@dataclass(frozen=True)
class DynamicFilterOutput:
    """A filter's verdict on one group, with Miles' field names: keep it or drop it, and why."""

    keep: bool
    reason: str | None = None


def check_reward_nonzero_std(args: Any, samples: Sequence[Sample], **kwargs: Any) -> DynamicFilterOutput:
    """Keep a group whose rewards are not all equal (DAPO's rule: a zero-variance group has no GRPO signal)."""
    rewards = [s.reward for s in samples]
    mean = sum(rewards) / len(rewards) if rewards else 0.0
    keep = any(r != mean for r in rewards)
    return DynamicFilterOutput(keep=keep, reason=None if keep else f"zero_std_{round(rewards[0], 1) if rewards else 0}")


def load_filter(path: str, base_dir: str | Path | None = None) -> Callable[..., Any]:
    """The filter named by ``dynamic_sampling_filter_path`` (aliases resolved); a ``UserError`` names the key."""
    path = ALIASES.get(path, path)
    return load_function(path, "rollout.dynamic_sampling_filter_path", f"the built-in filter is {BUILTIN!r}", base_dir)


def signature_problem(fn: Callable[..., Any], what: str) -> str | None:
    """Why ``fn`` cannot be called as Miles calls a filter, ``f(args, samples)``, or None."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        sig.bind("args", "samples")
    except TypeError as e:
        return (
            f"{what} takes {sig} and cannot be called as f(args, samples) ({e}); give it two positional "
            "arguments: the [rollout] config and the list of a prompt's scored samples"
        )
    return None


def verdict(fn: Callable[..., Any], config: Any, group: list[Sample]) -> DynamicFilterOutput:
    """Call ``fn`` on one scored group and read its answer (a bool, or an object with ``keep``)."""
    out = fn(config, group)
    keep = getattr(out, "keep", out)
    if hasattr(keep, "item"):  # a 0-d tensor or numpy bool, as Miles' own filter returns
        keep = keep.item()
    if not isinstance(keep, bool | int):
        raise UserError(
            f"rollout.dynamic_sampling_filter_path: the filter returned {out!r:.80}; return a bool or an object "
            "with a boolean `keep` (like DynamicFilterOutput)"
        )
    reason = getattr(out, "reason", None)
    return DynamicFilterOutput(keep=bool(keep), reason=None if reason is None else str(reason))
