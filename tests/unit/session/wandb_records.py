"""What an offline W&B run wrote: the records of its ``run-<id>.wandb`` file, read with W&B's own protobufs.

An offline run keeps everything it logged in one transaction log: a 7-byte header (``:W&B``, a magic
number, a version), then LevelDB's log format (32 KiB blocks; each chunk a checksum, a length, a type; a record
may span blocks as FIRST, MIDDLE, LAST chunks), each record a ``wandb.proto.wandb_internal_pb2.Record``. The
W&B package has no Python reader for it any more (``wandb sync`` reads it in its Go core), so the tests read it
here to see exactly what ``wandb sync`` would upload.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = 7
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    """Every record of the ``.wandb`` file at ``path``, in order (checksums are left to the protobuf parse)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    out, pos, pending = [], HEADER, b""
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


@dataclass
class OfflineRun:
    """One life of a W&B run as its offline folder holds it."""

    id: str
    project: str
    entity: str
    group: str
    name: str
    tags: list[str]
    config: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    """Each logged row, W&B's own ``_step``, ``_runtime``, ``_timestamp`` included."""
    axes: dict[str, str] = field(default_factory=dict)
    """Figure -> the figure it is drawn against (``define_metric``'s ``step_metric``)."""


def read_offline_run(folder: Path) -> OfflineRun:
    """The run, config, history rows and x axes of the offline W&B folder ``folder`` (``offline-run-<time>-<id>``)."""
    (log,) = folder.glob("run-*.wandb")
    run: OfflineRun | None = None
    history, axes = [], {}
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            config = {u.key: json.loads(u.value_json) for u in r.config.update if u.key != "_wandb"}
            run = OfflineRun(r.run_id, r.project, r.entity, r.run_group, r.display_name, list(r.tags), config)
        elif kind == "metric" and record.metric.step_metric:
            axes[record.metric.name] = record.metric.step_metric
        elif kind == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    assert run is not None, f"{log} has no run record"
    run.history, run.axes = history, axes
    return run
