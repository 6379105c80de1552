"""Free TCP ports on this machine, for the ports a run binds at run time.

The planner derives every port from the job id (:mod:`miles.plan.ports`); a
port can still be taken when the rank starts (on the local cluster every
virtual node is 127.0.0.1, and on a real node another job may hold it), so the
runtime asks here for the planned one and falls back to one the OS picks.
"""

from __future__ import annotations

import socket


def free_port(preferred: int = 0, host: str = "0.0.0.0") -> int:
    """``preferred`` when it can be bound on ``host`` now, else a free port from the OS (``0`` asks the OS)."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free TCP port")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that are free now (bound all at once, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()
