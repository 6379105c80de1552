"""Where checkpoints live on disk, and how a kill at any moment leaves a usable one.

Layout under ``[ckpt] save``::

    rollout-000020/            a complete checkpoint (resume continues at rollout 20)
        actor/                 the actor's sharded state (torch.distributed.checkpoint)
        driver.json            everything else: rollout id, data cursor, RNG states, spec ...
        MANIFEST.json          written last: every file's size and sha256
    .partial-rollout-000040/   a save in progress (or killed mid-way): never loaded

A checkpoint is written under a ``.partial-`` name and renamed into place only after
its manifest is written and fsynced, so a SIGKILL mid-save leaves the previous
checkpoint intact. On resume the newest directory whose manifest verifies is used; a
newer one that fails verification is skipped with a warning. Old checkpoints are
pruned only after a newer one is complete.

This module is pure file handling (no torch, no collectives) so that it can be unit
tested by corrupting files and killing writers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from miles.spec.tables import CkptConfig

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
_NAME = re.compile(r"^rollout-(\d{6,})$")


def checkpoint_name(rollout_id: int) -> str:
    """Directory name of the checkpoint taken before rollout ``rollout_id`` runs."""
    return f"rollout-{rollout_id:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: object) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class CheckpointStore:
    """The checkpoint directory of one run."""

    root: Path
    keep_last: int = 2

    @classmethod
    def of_run(cls, ckpt: CkptConfig, run_dir: str | Path) -> CheckpointStore:
        """The run's store: ``[ckpt] save`` (else ``<run_dir>/checkpoints``), keeping ``keep_last`` checkpoints."""
        return cls(Path(ckpt.save or Path(run_dir) / "checkpoints"), ckpt.keep_last)

    def partial_dir(self, rollout_id: int) -> Path:
        """A fresh in-progress directory for the checkpoint before ``rollout_id`` (old leftovers removed)."""
        path = self.root / f".partial-{checkpoint_name(rollout_id)}"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def commit(self, partial: Path, rollout_id: int) -> Path:
        """Seal ``partial`` with a manifest, rename it into place, then prune old checkpoints.

        Called by one process (the driver) after every rank has finished writing.
        """
        files = {}
        for p in sorted(partial.rglob("*")):
            if p.is_file():
                files[str(p.relative_to(partial))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(partial.rglob("*"), reverse=True):
            if p.is_file():
                with p.open("rb") as f:
                    os.fsync(f.fileno())
        write_json_atomic(partial / MANIFEST, {"rollout_id": rollout_id, "files": files})
        _fsync_dir(partial)
        final = self.root / checkpoint_name(rollout_id)
        if final.exists():
            # A checkpoint of the same rollout from an earlier life: replace it whole.
            stale = self.root / f".stale-{final.name}-{os.getpid()}"
            os.replace(final, stale)
            os.replace(partial, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(partial, final)
        _fsync_dir(self.root)
        self.prune()
        return final

    def complete(self) -> list[tuple[int, Path]]:
        """Checkpoints that carry a manifest, oldest first (not yet verified)."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _NAME.match(p.name)
            if m and (p / MANIFEST).is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def verify(self, path: Path) -> str | None:
        """Why ``path`` is not a usable checkpoint, or None when every file matches its manifest."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError) as e:
            return f"unreadable manifest ({e})"
        for rel, meta in files.items():
            f = path / rel
            if not f.is_file():
                return f"missing file {rel}"
            if f.stat().st_size != meta["size"]:
                return f"{rel} has {f.stat().st_size} bytes, manifest says {meta['size']}"
            if _sha256(f) != meta["sha256"]:
                return f"{rel} does not match its checksum"
        return None

    def newest_valid(self) -> tuple[int, Path] | None:
        """The newest checkpoint that verifies; newer broken ones are skipped with a warning."""
        for rollout_id, path in reversed(self.complete()):
            problem = self.verify(path)
            if problem is None:
                return rollout_id, path
            log.warning("skipping checkpoint %s: %s; falling back to an older one", path, problem)
        return None

    def prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints and drop leftovers of killed saves."""
        done = self.complete()
        for _, path in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)
        newest = done[-1][0] if done else -1
        for p in self.root.iterdir():
            m = re.match(r"^\.partial-rollout-(\d+)$", p.name)
            if m and int(m.group(1)) <= newest:
                shutil.rmtree(p, ignore_errors=True)
