"""One writer per run directory: a lock held by the live run and released by the kernel when it dies.

Two runs writing one run directory would interleave checkpoints, metrics and
engine announcements, and each would resume from the other's half-written state.
So whatever runs a run directory holds an exclusive ``flock`` on
``run_dir/control/lock`` for as long as it lives: ``miles run`` (its ranks inherit
the lock, so it is held until the last of them is gone) and, on Slurm, the batch
shell. The kernel drops the lock when the holder dies, however it dies, so a
killed run never leaves a stale lock behind. The file names the holder (host,
pid, what, since) so that the refusal can say who holds it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from miles.errors import UserError

LOCK = "control/lock"

_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
"""What ``flock`` fails with on a file system without locks (Lustre mounted without ``flock``, some NFS)."""


@dataclass
class RunDirLock:
    """A held lock on a run directory; the lock lasts while ``fd`` (or an inherited copy of it) is open."""

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def holder(run_dir: Path) -> dict[str, object]:
    """What the lock file says about its holder (empty when unreadable)."""
    try:
        data = json.loads((run_dir / LOCK).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(h: dict[str, object]) -> str:
    if not h:
        return "another process (its lock file names no holder)"
    return f"{h.get('what', 'a run')} (pid {h.get('pid')} on {h.get('host')}, since {h.get('since')})"


def acquire(run_dir: Path, what: str, settle_s: float = 15.0, wait_live_s: float = 0.0) -> RunDirLock:
    """Take the run directory's lock, or raise a :class:`UserError` (exit 2) naming the holder.

    When the named holder is a dead process of this host, its children still hold the lock while they die
    (the kernel kills them with their parent); the lock is then awaited for up to ``settle_s``. A live holder is
    awaited for ``wait_live_s``: a Slurm job that accounting already reports ended can still be in its epilogue.
    """
    path = run_dir / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    start = time.monotonic()
    end = start + settle_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno in _NO_LOCKS:
                    print(
                        f"miles: warning: the file system of {run_dir} does not support locks ({e.strerror}); "
                        "nothing keeps a second run out of it",
                        file=sys.stderr,
                        flush=True,
                    )
                    break
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            h = holder(run_dir)
            pid = h.get("pid")
            dying = h.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)
            patient = time.monotonic() < start + wait_live_s
            if not (dying or patient) or (dying and not patient and time.monotonic() >= end):
                raise UserError(
                    f"run directory {run_dir} is in use by {_describe(h)}; two runs must not write one run "
                    f"directory. Wait for it to end (or stop it), or set run.run_dir to another directory"
                )
            time.sleep(0.2)
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "what": what,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.set_inheritable(fd, True)
        return RunDirLock(path=path, fd=fd)
    except BaseException:
        os.close(fd)
        raise


def check_free(run_dir: Path, wait_live_s: float = 0.0) -> None:
    """Refuse (exit 2, naming the holder) when a live process holds the run directory's lock; takes nothing."""
    if not (run_dir / LOCK).exists():
        return
    acquire(run_dir, "a check", settle_s=0, wait_live_s=wait_live_s).release()
