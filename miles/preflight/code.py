"""Pre-flight of the user's code named in the spec: the custom reward, the dynamic-sampling filter and the
custom generate or rollout function, and the optional packages the spec asks for (``wandb``).

Each ``module:function`` (or ``file.py:function``) is imported the way the run
imports it (:func:`miles.reward.custom.load_function`, with the directory miles
is started in on ``sys.path`` as for the job's processes, and ``file.py`` paths
also looked up next to the spec), and its signature is checked against how it
will be called. Importing runs the module's top-level code, as the run would.
Code that imports only on the compute nodes (a package installed there alone)
is skipped with ``--skip-check code``.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from miles.errors import UserError
from miles.preflight.report import Report
from miles.reward.custom import call_problem, load_function
from miles.reward.filters import load_filter, signature_problem
from miles.reward.model import RewardModel
from miles.spec.tables import Spec

SKIP_HINT = "; if it imports only on the compute nodes, pass --skip-check code"
WANDB_INSTALL = "pip install -c constraints.txt wandb"
"""The fix when ``[run] use_wandb`` is set and the ``wandb`` package (an optional extra) is not installed."""


_GENERATION = {
    "custom_generate_function_path": "async def generate(input: GenerateFnInput) -> GenerateFnOutput",
    "rollout_function_path": "async def rollout(input: RolloutFnInput) -> RolloutFnOutput",
}
"""The generation hooks and the signature each is called with (miles/rollout/generate.py, docs/multi-turn.md)."""


def _generation_problem(fn: Callable[..., Any], what: str, contract: str) -> str | None:
    """Why ``fn`` cannot be called as ``f(input)``, the one argument both generation hooks receive."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        sig.bind("input")
    except TypeError as e:
        return f"{what} takes {sig} and cannot be called as f(input) ({e}); write it as `{contract}`"
    return None


def _check_generation(spec: Spec, report: Report, base_dir: Path | None) -> None:
    for key, contract in _GENERATION.items():
        path = getattr(spec.rollout, key)
        if not path:
            continue
        try:
            fn = load_function(path, f"rollout.{key}", "miles.rollout.multi_turn:generate", base_dir)
        except UserError as e:
            report.problem(("rollout", key), f"{e}{_hint(e)}")
            continue
        why = _generation_problem(fn, f"rollout.{key} = {path!r}", contract)
        if why:
            report.problem(("rollout", key), why)


def check_code(spec: Spec, report: Report) -> None:
    """Build the run's reward (``[rollout]`` rm_type, custom_rm_path or rm_url) and import its filter function."""
    base_dir = Path(spec.source).parent if spec.source else None
    ro = spec.rollout
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:  # the job's processes run `python -m ...` from this directory, which puts it on sys.path
        sys.path.insert(0, cwd)
    try:
        # The reward exactly as the run builds it (nothing is started: scoring workers start on first use).
        reward_key = next((k for k in ("custom_rm_path", "rm_url") if getattr(ro, k)), "rm_type")
        try:
            reward = RewardModel.from_spec(ro, base_dir=base_dir)
        except UserError as e:
            report.problem(("rollout", reward_key), f"{e}{_hint(e)}")
        else:
            custom = reward.per_group if ro.group_rm else reward.per_sample
            if ro.custom_rm_path and custom is not None:
                why = call_problem(custom, f"rollout.custom_rm_path = {ro.custom_rm_path!r}")
                if why:
                    report.problem(("rollout", "custom_rm_path"), why)
        if ro.dynamic_sampling_filter_path:
            key = "dynamic_sampling_filter_path"
            try:
                fn = load_filter(ro.dynamic_sampling_filter_path, base_dir)
            except UserError as e:
                report.problem(("rollout", key), f"{e}{_hint(e)}")
            else:
                why = signature_problem(fn, f"rollout.{key} = {ro.dynamic_sampling_filter_path!r}")
                if why:
                    report.problem(("rollout", key), why)
        _check_generation(spec, report, base_dir)
        if spec.run.use_wandb and importlib.util.find_spec("wandb") is None:
            report.problem(("run", "use_wandb"), f"the wandb package is not installed: {WANDB_INSTALL}{SKIP_HINT}")
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _hint(e: UserError) -> str:
    """The skip flag, for failures that may come from this machine lacking what the compute nodes have."""
    text = str(e)
    return SKIP_HINT if any(s in text for s in ("cannot import", "failed:", "no such file")) else ""
