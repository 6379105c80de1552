"""Where a spec's relative input paths point: the directory of the spec file that names them.

A spec is written next to its data, reward code and models (``rewards.py:score``
beside ``run.toml``), and it is read in several places: ``miles validate`` and
``miles submit`` on a login node (from any directory), ``miles run``, and every
rank inside the job, which reads the copy ``RUN_DIR/spec.toml``. So the loader
makes each relative *input* path absolute once, from the directory of the file
that wrote it, and the copy records the absolute path; nothing later depends on
where it is read from. A value given with ``--set`` on the command line is
relative to the current directory, as any command-line path is.

Inputs, resolved: ``rollout.prompt_data``, ``eval.eval_prompt_data`` values,
``rollout.custom_rm_path`` and ``rollout.dynamic_sampling_filter_path`` in their
``file.py:function`` form (``package.module:function`` is imported, not a path),
``model.hf_checkpoint``, ``ckpt.load`` and ``ckpt.ref_load``. A relative model
directory that does not exist beside the spec and does not start with ``./`` or
``../`` (a name like ``Org/Model``) is kept as written.

Outputs (``run.run_dir``, ``ckpt.save``, ``ckpt.save_hf``) stay relative to the
directory miles is started from, which is also the job's working directory:
``runs/<name>`` is where ``miles submit`` prints it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from miles.spec.tables import Spec

Anchor = Callable[[tuple[str, ...]], Path | None]
"""The directory a key's relative path resolves from (None: leave it as written)."""


def _absolute(value: str, base: Path | None) -> str:
    if not value or base is None or "://" in value or os.path.isabs(value):
        return value
    return os.path.normpath(base / value)


def _code_path(value: str, base: Path | None) -> str:
    """``file.py:function`` with the file made absolute; ``module:function`` unchanged."""
    file, sep, attr = value.rpartition(":")
    if not sep or not file.endswith(".py"):
        return value
    return f"{_absolute(file, base)}:{attr}"


def _model_dir(value: str, base: Path | None) -> str:
    if not value or base is None or os.path.isabs(value):
        return value
    if value.startswith(("./", "../")) or (base / value).exists():
        return _absolute(value, base)
    return value


def anchor_paths(spec: Spec, anchor: Anchor) -> Spec:
    """``spec`` with every relative input path made absolute from ``anchor((table, key))``."""

    def swap(table: str, changes: dict[str, Any]) -> dict[str, Any]:
        return {table: dataclasses.replace(getattr(spec, table), **changes)}

    ro, ev, model, ckpt = spec.rollout, spec.eval, spec.model, spec.ckpt
    tables: dict[str, Any] = {}
    tables |= swap(
        "rollout",
        {
            "prompt_data": _absolute(ro.prompt_data, anchor(("rollout", "prompt_data"))),
            "custom_rm_path": _code_path(ro.custom_rm_path, anchor(("rollout", "custom_rm_path"))),
            "dynamic_sampling_filter_path": _code_path(
                ro.dynamic_sampling_filter_path, anchor(("rollout", "dynamic_sampling_filter_path"))
            ),
        },
    )
    tables |= swap(
        "eval",
        {
            "eval_prompt_data": {
                k: _absolute(v, anchor(("eval", "eval_prompt_data", k))) for k, v in ev.eval_prompt_data.items()
            }
        },
    )
    tables |= swap("model", {"hf_checkpoint": _model_dir(model.hf_checkpoint, anchor(("model", "hf_checkpoint")))})
    tables |= swap(
        "ckpt",
        {
            "load": _model_dir(ckpt.load, anchor(("ckpt", "load"))),
            "ref_load": _model_dir(ckpt.ref_load, anchor(("ckpt", "ref_load"))),
        },
    )
    return dataclasses.replace(spec, **tables)
