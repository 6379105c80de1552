"""Checkpoint files: atomic commit, manifest verification, fallback and pruning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from miles.ckpt.store import CheckpointStore, checkpoint_name


def _save(store: CheckpointStore, rollout_id: int, payload: bytes = b"weights") -> Path:
    partial = store.partial_dir(rollout_id)
    (partial / "actor").mkdir()
    (partial / "actor" / "shard-0.bin").write_bytes(payload * 100)
    (partial / "driver.json").write_text(json.dumps({"rollout_id": rollout_id}))
    return store.commit(partial, rollout_id)


def test_commit_renames_into_place_and_verifies(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2)
    final = _save(store, 3)
    assert final.name == checkpoint_name(3) == "rollout-000003"
    assert not list(tmp_path.glob(".partial-*"))
    assert store.verify(final) is None
    assert store.newest_valid() == (3, final)


def test_keep_last_prunes_only_after_a_newer_one_is_complete(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2)
    for r in (1, 2, 3):
        _save(store, r)
    assert [r for r, _ in store.complete()] == [2, 3]
    # A save in progress (no manifest yet) does not count and prunes nothing.
    partial = store.partial_dir(4)
    (partial / "driver.json").write_text("{}")
    store.prune()
    assert [r for r, _ in store.complete()] == [2, 3]
    assert store.newest_valid() is not None and store.newest_valid()[0] == 3  # type: ignore[index]


def test_corrupted_newest_is_skipped_with_a_warning(tmp_path: Path, caplog: object) -> None:
    store = CheckpointStore(tmp_path, keep_last=3)
    _save(store, 1)
    newest = _save(store, 2)
    shard = newest / "actor" / "shard-0.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    found = store.newest_valid()
    assert found is not None and found[0] == 1
    assert "does not match its checksum" in caplog.text  # type: ignore[attr-defined]


def test_truncated_and_missing_files_are_detected(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=3)
    a = _save(store, 1)
    b = _save(store, 2)
    (b / "driver.json").unlink()
    assert "missing file driver.json" in (store.verify(b) or "")
    with (a / "actor" / "shard-0.bin").open("r+b") as f:
        f.truncate(5)
    assert "bytes, manifest says" in (store.verify(a) or "")
    assert store.newest_valid() is None


def test_sigkill_mid_save_leaves_previous_checkpoint_intact(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2)
    _save(store, 1)
    # A writer killed while its partial directory is half written.
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from miles.ckpt.store import CheckpointStore
        store = CheckpointStore(Path({str(tmp_path)!r}), keep_last=2)
        partial = store.partial_dir(2)
        (partial / "driver.json").write_text("{{}}")
        (partial / "big.bin").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False)
    assert proc.returncode == -9
    assert (tmp_path / ".partial-rollout-000002").exists()
    found = store.newest_valid()
    assert found is not None and found[0] == 1
    # The next successful save cleans the leftover.
    _save(store, 2)
    assert not (tmp_path / ".partial-rollout-000002").exists()
    assert os.path.isdir(tmp_path / "rollout-000002")


def test_resaving_the_same_rollout_replaces_it_whole(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2)
    _save(store, 5, b"old")
    final = _save(store, 5, b"new")
    assert (final / "actor" / "shard-0.bin").read_bytes() == b"new" * 100
    assert store.verify(final) is None
