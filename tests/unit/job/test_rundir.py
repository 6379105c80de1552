"""Run-directory files: atomic writes, engine announcements of this launch only, the driver's deadline."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from miles.errors import UserError
from miles.job import rundir
from miles.launch.submission import gpus_in_gres


def _announce(run_dir: Path, i: int, launch: str) -> None:
    rundir.announce_engine(
        run_dir,
        rundir.Announcement(index=i, url=f"http://h:{9000 + i}", host="h", port=9000 + i, pid=1, launch_id=launch),
    )


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    rundir.write_json(tmp_path / "a" / "x.json", {"k": 1})
    assert rundir.read_json(tmp_path / "a" / "x.json") == {"k": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]
    with pytest.raises(UserError, match="is this a miles run directory"):
        rundir.read_json(tmp_path / "missing.json")


def test_driver_waits_for_this_launch_and_names_missing_engines(tmp_path: Path) -> None:
    _announce(tmp_path, 0, "old")  # a previous launch's engine: gone, must be ignored
    _announce(tmp_path, 1, "now")
    with pytest.raises(TimeoutError, match=r"engines \[0, 2\] of 3 did not announce"):
        rundir.wait_for_engines(tmp_path, 3, "now", deadline_s=0.5, poll_s=0.05)
    late = threading.Timer(0.3, lambda: [_announce(tmp_path, i, "now") for i in (0, 2)])
    late.start()
    t0 = time.monotonic()
    found = rundir.wait_for_engines(tmp_path, 3, "now", deadline_s=10, poll_s=0.05)
    assert [a.port for a in found] == [9000, 9001, 9002] and time.monotonic() - t0 < 5


def test_gpus_in_sinfo_gres() -> None:
    assert gpus_in_gres("gpu:4") == 4
    assert gpus_in_gres("gpu:a100:8(S:0-1)") == 8
    assert gpus_in_gres("gpu:a100:2,gpu:v100:2") == 4
    assert gpus_in_gres("(null)") == 0
