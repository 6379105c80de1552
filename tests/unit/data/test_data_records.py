"""Reading the head of a prompt file: only the first records are parsed, in JSONL and parquet alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miles.data import read_records
from miles.errors import UserError


def test_limit_reads_only_the_head(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"input": str(i)}) + "\n" for i in range(5)) + "{broken\n")
    head = read_records(path, limit=5)
    assert [r.fields["input"] for r in head] == ["0", "1", "2", "3", "4"] and head[-1].location == f"{path}:5"
    with pytest.raises(UserError, match=r"p.jsonl:6: invalid JSON"):
        read_records(path)


def test_limit_on_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"input": str(i)} for i in range(300)]), path, row_group_size=50)
    assert [r.location for r in read_records(path, limit=3)] == [f"{path}:row {i}" for i in (1, 2, 3)]
    assert len(read_records(path)) == 300
