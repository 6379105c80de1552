"""What ``miles run`` prints: every rank's output, prefixed, and a failure told once, cause first.

When one rank fails, the others end because of it, many with a traceback of
their own (a lost peer, a closed socket) that says nothing about the cause and
buries it. So the console decides which rank failed first (the first to report
its failure, or to exit while the run was going) and from then on prints only
that rank's output: the others' lines, tracebacks included, go to their log
files in ``run_dir/logs/`` only (``trainer-1.out``), and the launcher sums them up in one line
(``trainer 1, engine 0 ended because trainer 0 failed``).

A traceback is held back until the rank's closing ``miles task ... FAILED`` line
(:mod:`miles.launch.task` prints it after the traceback) says whose it is: the
cause's is printed whole, a follower's is not printed at all.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

_TRACEBACK = "Traceback (most recent call last):"
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")
_FAILED = re.compile(r"^miles task .* (FAILED\b|exited with code [1-9])")


class Console:
    """Prefixes and serializes the ranks' output lines; copies each rank's lines to its log file."""

    def __init__(self, out: IO[str], log_dir: Path | None = None) -> None:
        self.out = out
        self.log_dir = log_dir
        self.lock = threading.Lock()
        self.cause: str | None = None
        """The rank whose failure ended the run (the first to fail), once known."""
        self.muted: set[str] = set()
        """Ranks with lines not printed because another rank's failure came first."""
        self.failed_ranks: Callable[[], list[str]] = list
        """The ranks whose processes have ended in failure by now (the launcher sets it): a rank killed by a
        signal prints nothing, and its peers report the lost connection before the launcher's next look."""

    def log_path(self, name: str) -> Path | None:
        return self.log_dir / f"{name.replace(' ', '-')}.out" if self.log_dir is not None else None

    def blame(self, name: str) -> str:
        """Name ``name`` the cause unless a cause is known already; returns the cause."""
        with self.lock:
            if self.cause is None:
                self.cause = name
            return self.cause

    def pump(self, name: str, stream: IO[bytes]) -> None:
        path = self.log_path(name)
        log = open(path, "a", encoding="utf-8") if path is not None else None  # noqa: SIM115 - closed below
        held: list[str] = []
        complete = False  # the held traceback reached its exception line
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace").rstrip("\n")
                if log is not None:
                    log.write(line + "\n")
                    log.flush()
                if _FAILED.match(line):
                    self.blame(next((n for n in self.failed_ranks() if n != name), name))
                    self._emit(name, [*held, line])
                    held, complete = [], False
                    continue
                if held and complete and not (line.strip() == "" or line.startswith(_CHAINED)):
                    self._emit(name, held)  # a traceback the rank survived
                    held, complete = [], False
                if held or line.startswith(_TRACEBACK):
                    held.append(line)
                    complete = (
                        complete
                        or bool(line.strip())
                        and not line[0].isspace()
                        and not line.startswith((_TRACEBACK, *_CHAINED))
                    )
                    if line.startswith(_CHAINED):
                        complete = False
                    continue
                self._emit(name, [line])
            if held:
                self._emit(name, held)
        finally:
            if log is not None:
                log.close()

    def _emit(self, name: str, lines: list[str]) -> None:
        with self.lock:
            if self.cause is not None and self.cause != name:
                self.muted.add(name)
                return
            for line in lines:
                self.out.write(f"{name} | {line}\n")
            self.out.flush()

    def say(self, msg: str) -> None:
        with self.lock:
            self.out.write(f"miles run: {msg}\n")
            self.out.flush()
