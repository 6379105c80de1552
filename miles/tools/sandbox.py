"""Running model-written code in a child process with a time limit, a memory limit and no network.

The child is ``python -I`` (isolated: no user site, no environment variables
that change imports), started in a new session so a timeout kills it and all
it spawned, with ``RLIMIT_AS`` (address space) and ``RLIMIT_CPU`` set before it
runs, and in a new network namespace (``unshare(CLONE_NEWNET)``; where the
process lacks ``CAP_SYS_ADMIN``, a new user namespace with it): the only
interface it sees is a loopback that is down, so every connection fails.

When the kernel refuses both namespaces (a container without the capability and
with unprivileged user namespaces off) nothing runs: the result says so, and
the tool message tells the model the call failed. There is no silent fallback
to a sandbox with network.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

NO_NETNS = 125
"""Exit status of a child whose network namespace could not be made (before any user code ran)."""
NO_NETNS_MARK = b"miles sandbox: the kernel refused a network namespace (unshare CLONE_NEWNET)\n"


@dataclass(frozen=True)
class SandboxLimits:
    """What one run of model-written code may use."""

    timeout_s: float = 5.0
    """Wall-clock seconds before the child (and its process group) is killed."""
    memory_mb: int = 512
    """Address-space limit of the child (``RLIMIT_AS``); an allocation past it fails with MemoryError."""
    output_bytes: int = 8192
    """Bytes of stdout and of stderr kept (the rest is cut; a tool message stays short)."""


@dataclass(frozen=True)
class SandboxResult:
    """How one run ended."""

    stdout: str
    stderr: str
    returncode: int
    timed_out: bool = False
    """Killed after ``timeout_s``."""
    no_network_namespace: bool = False
    """The kernel refused a network namespace: the code did not run."""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _unshare_network() -> None:
    """In the child before exec: a network namespace of its own, or exit ``NO_NETNS`` (nothing runs)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) == 0:
        return
    if ctypes.get_errno() == errno.EPERM and libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        return
    os.write(2, NO_NETNS_MARK)
    os._exit(NO_NETNS)


def _child_setup(limits: SandboxLimits) -> None:
    _unshare_network()
    mem = limits.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    cpu = max(1, int(limits.timeout_s) + 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(code: str, limits: SandboxLimits) -> SandboxResult:
    """Run ``code`` as a Python program in the sandbox; blocks at most about ``limits.timeout_s``."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(  # noqa: S603 - the command is this interpreter; the code goes in on stdin
        [sys.executable, "-I", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd="/",
        start_new_session=True,
        preexec_fn=lambda: _child_setup(limits),  # noqa: PLW1509 - single-threaded child setup before exec
    )
    try:
        out, err = proc.communicate(code.encode(), timeout=limits.timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        timed_out = True
    cut = limits.output_bytes
    return SandboxResult(
        stdout=out[:cut].decode(errors="replace"),
        stderr=err[-cut:].decode(errors="replace"),
        returncode=proc.returncode,
        timed_out=timed_out,
        no_network_namespace=proc.returncode == NO_NETNS and err.startswith(NO_NETNS_MARK),
    )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
