"""Raw prompt records read from JSONL or parquet files, each with its source location.

Reading is separated from rendering (``miles.data.dataset``) so that every
later complaint about a record (missing key, wrong type, a chat template that
rejects it) can name the exact ``file:line`` (JSONL) or ``file:row N`` (parquet)
the user has to fix.
"""

from __future__ import annotations

import itertools
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


def read_records(path: str | Path, spec_key: str = "rollout.prompt_data", limit: int | None = None) -> list[Record]:
    """Read every record of a ``.jsonl`` or ``.parquet`` file, or only its first ``limit`` records.

    ``spec_key`` names the spec field that pointed here, so a missing file or a
    bad suffix tells the user which line of the run spec to change. ``limit``
    serves the pre-flight check, which reads the head of a file before any
    process starts, and leaves the rest to the run itself.
    """
    p = Path(path)
    if not str(path):
        raise UserError(f"{spec_key} is empty: set it to a .jsonl or .parquet prompt file")
    if p.suffix not in SUFFIXES:
        raise UserError(f"{spec_key} = {str(path)!r}: unsupported file type {p.suffix!r}; use .jsonl or .parquet")
    if not p.is_file():
        raise UserError(f"{spec_key} = {str(path)!r}: no such file")
    records = _jsonl_records(p) if p.suffix == ".jsonl" else _parquet_records(p, limit)
    try:
        return list(itertools.islice(records, limit))
    except PermissionError:
        raise UserError(f"{spec_key} = {str(path)!r}: not readable (permission denied); fix its permissions") from None
    except OSError as exc:
        raise UserError(f"{spec_key} = {str(path)!r}: cannot be read: {exc}") from None


def _jsonl_records(path: Path) -> Iterator[Record]:
    index = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            location = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{location}: not UTF-8 text; a .jsonl file holds one JSON object per line") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{location}: invalid JSON ({exc.msg} at column {exc.colno}); fix or remove this line: "
                    "each line holds one JSON object"
                ) from None
            if not isinstance(value, dict):
                raise UserError(f"{location}: each line must be a JSON object, got {type(value).__name__}")
            yield Record(index=index, location=location, fields=value)
            index += 1


def _parquet_records(path: Path, limit: int | None) -> Iterator[Record]:
    import pyarrow.parquet as pq  # heavy; only needed for parquet data

    try:
        if limit is None:
            rows = pq.read_table(path).to_pylist()
        else:
            batch = next(pq.ParquetFile(path).iter_batches(batch_size=max(limit, 1)), None)
            rows = batch.to_pylist() if batch is not None else []
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise UserError(
            f"{path}: not a readable parquet file ({exc}); write it again (pyarrow, pandas.to_parquet) or use .jsonl"
        ) from None
    for row, value in enumerate(rows, start=1):
        yield Record(index=row - 1, location=f"{path}:row {row}", fields=value)
