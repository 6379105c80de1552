"""Helpers for the spec tests (imported by conftest.py and the tests): write a small valid spec with changes, and find a
key's line in it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from miles.spec import SpecError, load_spec
from miles.spec.writer import toml_key, toml_value

DROP = object()
"""A change that removes the key from the base spec."""

BASE: dict[str, dict[str, Any]] = {
    "run": {"name": "t", "num_rollout": 3},
    "model": {"builtin": "tiny-arith"},
    "rollout": {
        "prompt_data": "data/prompts.jsonl",
        "rm_type": "exact_match",
        "rollout_batch_size": 4,
        "n_samples_per_prompt": 2,
    },
    "train": {"global_batch_size": 8},
}


def render(changes: dict[str, dict[str, Any]] | None = None) -> str:
    """The base spec with ``changes`` ({table: {key: value or DROP}}) as TOML, one key per line."""
    tables = copy.deepcopy(BASE)
    for table, keys in (changes or {}).items():
        target = tables.setdefault(table, {})
        for key, value in keys.items():
            if value is DROP:
                target.pop(key, None)
            else:
                target[key] = value
    lines = ["# a test spec"]
    for table, keys in tables.items():
        lines += ["", f"[{table}]"] + [f"{toml_key(k)} = {toml_value(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def line_of(text: str, table: str, key: str | None = None) -> int:
    """1-based line of ``[table]`` or of ``key =`` inside it, found by plain text search."""
    lines = text.splitlines()
    start = lines.index(f"[{table}]")
    if key is None:
        return start + 1
    for i in range(start + 1, len(lines)):
        if lines[i].startswith("["):
            break
        if lines[i].split("=")[0].strip() == key:
            return i + 1
    raise AssertionError(f"{key} not in [{table}]")


class SpecFiles:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.count = 0

    def write(self, changes: dict[str, dict[str, Any]] | None = None, text: str | None = None) -> tuple[Path, str]:
        self.count += 1
        path = self.tmp_path / f"spec{self.count}.toml"
        text = render(changes) if text is None else text
        path.write_text(text)
        return path, text

    def error(
        self, changes: dict[str, dict[str, Any]] | None = None, text: str | None = None, overrides: tuple[str, ...] = ()
    ) -> tuple[str, Path, str]:
        """Load a spec that must fail; return the error message, the path and the text."""
        path, text = self.write(changes, text)
        with pytest.raises(SpecError) as info:
            load_spec(path, overrides)
        return str(info.value), path, text
