"""Loading a user's reward function from ``custom_rm_path`` and calling it the way it was written.

Two spellings are accepted: ``package.module:function`` (importable from
``sys.path``) and ``path/to/file.py:function`` (a file next to the run spec,
no packaging needed). The function may be sync or async and may take the
sample alone or, like Miles' ``f(args, sample)``, the ``[rollout]`` config first.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from miles.errors import UserError


def load_function(path: str, spec_key: str, known: str, base_dir: str | Path | None = None) -> Callable[..., Any]:
    """The callable named by ``path``; any failure is a ``UserError`` naming ``spec_key`` and the built-ins
    ``known``.
    """
    module_part, sep, attr = path.rpartition(":")
    if not sep or not module_part or not attr:
        raise UserError(
            f"{spec_key} = {path!r}: expected 'module:function' or 'path/to/file.py:function'. Built-in rewards "
            f"(rollout.rm_type) are: {known}"
        )
    if module_part.endswith(".py"):
        module = _load_file(module_part, spec_key, base_dir)
    else:
        try:
            module = importlib.import_module(module_part)
        except Exception as exc:
            raise UserError(
                f"{spec_key} = {path!r}: cannot import module {module_part!r}: {type(exc).__name__}: {exc}. "
                f"Check PYTHONPATH, or use a file path 'file.py:function'. Built-in rewards are: {known}"
            ) from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        found = "" if fn is None else f" ({attr!r} is a {type(fn).__name__})"
        raise UserError(
            f"{spec_key} = {path!r}: module {module_part!r} has no callable {attr!r}{found}; "
            "name a function defined in that module"
        )
    return fn


def _load_file(file: str, spec_key: str, base_dir: str | Path | None) -> Any:
    p = Path(file)
    if not p.is_absolute() and base_dir is not None and not p.exists():
        p = Path(base_dir) / p
    if not p.is_file():
        raise UserError(
            f"{spec_key}: no such file {str(p)!r}; relative paths are looked up in the directory miles "
            "is started in, then next to the spec"
        )
    # A stable, unique module name per file, so two reward files named reward.py do not collide.
    name = f"miles_custom_rm_{hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise UserError(f"{spec_key}: cannot load {str(p)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise UserError(f"{spec_key}: executing {str(p)!r} failed: {type(exc).__name__}: {exc}") from None
    return module


def wants_config(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` takes two required positional arguments, Miles' ``(args, sample)`` convention."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is inspect.Parameter.empty
    ]
    return len(positional) >= 2


def call_problem(fn: Callable[..., Any], what: str) -> str | None:
    """Why ``fn`` cannot be called the way miles calls a reward, or None.

    A reward is called as ``fn(sample)``, or as ``fn(config, sample)`` when it
    takes two required positional arguments (:func:`wants_config`); a group
    reward gets the list of a prompt's samples in place of ``sample``.
    Callables whose signature Python cannot read (some builtins) pass.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    args = ("config", "sample") if wants_config(fn) else ("sample",)
    try:
        sig.bind(*args)
    except TypeError as e:
        return (
            f"{what} takes {sig} and cannot be called as f(sample) or f(args, sample) ({e}); give it one "
            "required positional argument (the sample), or two (the [rollout] config, the sample)"
        )
    return None


def is_async(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` returns a coroutine, looking through ``functools.partial`` and callable objects."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)
