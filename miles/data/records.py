"""Raw prompt records read from JSONL or parquet files, each with its source location.

Reading is separated from rendering (``miles.data.dataset``) so that every
later complaint about a record (missing key, wrong type, a chat template that
rejects it) can name the exact ``file:line`` (JSONL) or ``file:row N`` (parquet)
the user has to fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miles.errors import UserError

SUFFIXES = (".jsonl", ".parquet")
"""File types a prompt dataset may have (Miles ``--prompt-data`` accepts the same)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One record of a prompt file, before the prompt is rendered or tokenized."""

    index: int
    """0-based position among the file's records (blank JSONL lines are not records)."""

    location: str
    """Where the record lives, for error messages: ``path:line`` or ``path:row N``."""

    fields: dict[str, Any]
    """The record's key/value pairs as decoded from JSON or parquet."""


def read_records(path: str | Path, spec_key: str = "rollout.prompt_data") -> list[Record]:
    """Read every record of a ``.jsonl`` or ``.parquet`` file.

    ``spec_key`` names the spec field that pointed here, so a missing file or a
    bad suffix tells the user which line of the run spec to change.
    """
    p = Path(path)
    if not str(path):
        raise UserError(f"{spec_key} is empty: set it to a .jsonl or .parquet prompt file")
    if p.suffix not in SUFFIXES:
        raise UserError(f"{spec_key} = {str(path)!r}: unsupported file type {p.suffix!r}; use .jsonl or .parquet")
    if not p.is_file():
        raise UserError(f"{spec_key} = {str(path)!r}: no such file")
    if p.suffix == ".jsonl":
        return list(_jsonl_records(p))
    return list(_parquet_records(p))


def _jsonl_records(path: Path) -> Iterator[Record]:
    index = 0
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            location = f"{path}:{lineno}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{location}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(value, dict):
                raise UserError(f"{location}: each line must be a JSON object, got {type(value).__name__}")
            yield Record(index=index, location=location, fields=value)
            index += 1


def _parquet_records(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq  # heavy; only needed for parquet data

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    for row, value in enumerate(table.to_pylist(), start=1):
        yield Record(index=row - 1, location=f"{path}:row {row}", fields=value)
