"""A real local Slurm cluster for the tests marked ``slurm``.

The session fixture installs (apt, once) and starts ``slurm/local-cluster.sh``
when this machine can: root with apt-get. Otherwise every Slurm test is skipped
with the reason spelled out in pytest's ``-ra`` summary. A cluster that was
already up (a developer's, or another test session's) is used and left
running; one this session started is stopped at the end, by recorded PID, even
when tests fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "slurm" / "local-cluster.sh"


def _cluster(cmd: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), cmd], capture_output=True, text=True, timeout=timeout)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return (
            "SLURM TESTS SKIPPED: not root, so the local Slurm cluster cannot be installed/started "
            "(run as root with apt, or start slurm/local-cluster.sh yourself and export SLURM_CONF)"
        )
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "SLURM TESTS SKIPPED: no apt-get and no Slurm installed on this machine"
    return None


def _live_users(users: Path) -> list[Path]:
    """Pid files of test sessions that use the cluster and still run (dead ones are removed)."""
    live = []
    for f in users.glob("*"):
        try:
            os.kill(int(f.name), 0)
            live.append(f)
        except (ValueError, ProcessLookupError):
            f.unlink(missing_ok=True)
        except PermissionError:
            live.append(f)
    return live


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, str]]:
    """Start (or reuse) the local cluster; yields {"SLURM_CONF": ...}, exported for the whole session.

    Several test sessions may share one cluster (developers on one machine): each
    registers its pid under ``run/test-users``; the last one to leave stops the
    cluster if a test session started it (``run/started-by-tests``), and a
    cluster someone started by hand is left running.
    """
    conf = _cluster("env", 10).stdout.strip().removeprefix("export SLURM_CONF=")
    base = Path(conf).parent.parent
    users, marker = base / "run" / "test-users", base / "run" / "started-by-tests"
    if _cluster("status", 30).returncode != 0:
        why = _why_not()
        if why:
            print(f"\n*** {why} ***", file=sys.stderr)
            pytest.skip(why)
        t0 = time.monotonic()
        res = _cluster("install", 900)
        if res.returncode != 0:
            pytest.fail(f"slurm/local-cluster.sh install failed:\n{res.stdout}\n{res.stderr}")
        t1 = time.monotonic()
        res = _cluster("start", 180)
        if res.returncode != 0:
            _cluster("stop", 120)
            pytest.fail(f"slurm/local-cluster.sh start failed:\n{res.stdout}\n{res.stderr}")
        marker.touch()
        print(f"\nlocal Slurm cluster: install {t1 - t0:.1f} s, start {time.monotonic() - t1:.1f} s", file=sys.stderr)
    me = users / str(os.getpid())
    try:
        users.mkdir(parents=True, exist_ok=True)
        me.touch()
    except OSError:  # a cluster root started, used by a non-root session: nothing to register
        pass
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield {"SLURM_CONF": conf}
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        try:
            me.unlink(missing_ok=True)
        except OSError:
            pass
        if marker.exists() and os.geteuid() == 0 and not _live_users(users):
            res = _cluster("stop", 180)
            if res.returncode != 0:
                print(f"slurm/local-cluster.sh stop failed:\n{res.stderr}", file=sys.stderr)
