"""Every process a run starts dies with the process that started it, however that one dies.

A run is a tree: ``miles run`` starts one task per engine and trainer rank; an
engine task starts its server (SGLang or the embedded engine) and SGLang its
scheduler processes; the driver may start sglang-router. When a parent ends by
SIGKILL (an OOM kill, a user's ``kill -9``, a node agent) it runs no cleanup,
and its children would live on as orphans, holding ports, memory and GPUs and
writing into the run directory a new run now uses.

So every child is started with the kernel's parent-death signal
(``prctl(PR_SET_PDEATHSIG, SIGKILL)``, in ``preexec_fn``): when its parent dies,
the kernel kills it, and its own children follow the same way down the tree
(SGLang sets the same signal in its scheduler processes). The signal fires when
the *thread* that started the child ends, so a child must be started from a
thread that lives as long as the child is meant to.

:func:`watch_parent` is the second line for processes that start children of
their own: it notices that the parent is gone (the process was re-parented)
and ends the process's whole group, for children started without the signal.

On Slurm, srun's ``--kill-on-bad-exit`` and the step's process tracking (every
process of a step is killed when the step ends) do this for the job's steps.
Elsewhere than Linux this module does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from collections.abc import Callable

PR_SET_PDEATHSIG = 1

_prctl: Callable[..., int] | None = None
if sys.platform.startswith("linux"):
    try:  # resolved now: after fork, in preexec_fn, loading a library could deadlock
        _prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        _prctl = None


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when the process starting it dies.

    If the parent died between the fork and the ``prctl`` (the signal would then never come), the child
    kills itself at once.
    """
    parent = os.getpid()

    def preexec() -> None:
        if _prctl is None:
            return
        _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def available() -> bool:
    """Whether the kernel's parent-death signal is available here (Linux)."""
    return _prctl is not None


def watch_parent(poll_s: float = 0.5, on_orphaned: Callable[[], None] | None = None) -> threading.Thread:
    """Start a daemon thread that ends this process's group once its parent is gone.

    ``on_orphaned`` runs first (e.g. to stop a server the process started); then the group is sent
    SIGKILL, which also ends this process. The group is ours only when this process leads it (a task
    started in a session of its own); otherwise only this process is killed.
    """
    parent = os.getppid()

    def run() -> None:
        stop = threading.Event()
        while not stop.wait(poll_s):
            if os.getppid() != parent:
                break
        if on_orphaned is not None:
            try:
                on_orphaned()
            except BaseException:  # noqa: BLE001 - dying anyway; nothing to report to
                pass
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    t = threading.Thread(target=run, name="miles-parent-watch", daemon=True)
    t.start()
    return t
