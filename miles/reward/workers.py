"""Child processes for rule rewards, killed and replaced when a call overruns its timeout.

Equivalence checking goes through sympy, and a model can answer
``\\boxed{9^{9^{9^{9}}}}``: sympy then computes an astronomically large integer,
inside C code that holds the GIL. A thread cannot be stopped and would stall
the whole trainer process; a child process can be killed. Each worker serves
one call at a time over a pipe; the parent waits on the pipe's file descriptor
in the event loop, so waiting costs no thread.

Workers are started with ``spawn`` (forking a process that already runs torch
and NCCL/gloo threads is unsafe) and import the equivalence checker before
saying they are ready, so start-up time never counts against a call's timeout.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

START_TIMEOUT = 120.0
"""Seconds a new worker may take to import its libraries (slow shared filesystems on clusters)."""


class WorkerError(Exception):
    """The call raised in the worker; the message carries the worker-side exception type and text."""


def _serve(conn: Connection) -> None:
    """Worker main loop: ``(fn, args)`` in, ``("ok", result)`` or ``("err", message)`` out, ``None`` to stop.

    Ctrl-C reaches the whole process group; the parent decides when workers
    stop (it saves a checkpoint first), so workers ignore SIGINT and simply exit
    when the parent's end of the pipe goes away.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import miles.reward.answers as answers  # deferred: sympy and math-verify, loaded in the worker process only

    answers.math_equal("1/2", "0.5")  # import math-verify and sympy now, not inside the first timed call
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent died
            return
        if msg is None:
            return
        fn, args = msg
        try:
            conn.send(("ok", fn(*args)))
        except Exception as exc:
            conn.send(("err", f"{type(exc).__name__}: {exc}"))


class _Worker:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process: BaseProcess = ctx.Process(target=_serve, args=(child,), daemon=True, name="miles-reward-rule")
        self.process.start()
        child.close()
        self.ready = False

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class WorkerPool:
    """``await pool.call(fn, *args, timeout=s)`` runs a picklable module-level ``fn`` in a worker process."""

    def __init__(self, size: int | None = None) -> None:
        self.size = size or max(1, min(8, (os.cpu_count() or 2) // 2))
        self._idle: asyncio.Queue[_Worker] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._all: list[_Worker] = []

    def _queue(self) -> asyncio.Queue[_Worker]:
        loop = asyncio.get_running_loop()
        if self._idle is None or self._loop is not loop:
            # A new event loop (score_blocking runs one per call): the old queue is bound to the dead loop.
            self._idle, self._loop = asyncio.Queue(), loop
            self._all = [w for w in self._all if w.process.is_alive()]
            while len(self._all) < self.size:
                self._all.append(_Worker())
            for w in self._all:
                self._idle.put_nowait(w)
        return self._idle

    async def call(self, fn: Callable[..., Any], *args: Any, timeout: float) -> Any:
        """``fn(*args)`` in a worker; ``TimeoutError`` (worker killed and replaced) after ``timeout`` seconds."""
        idle = self._queue()
        worker = await idle.get()
        try:
            if not worker.ready:
                kind, _ = await self._receive(worker, START_TIMEOUT)
                worker.ready = kind == "ready"
            worker.conn.send((fn, args))
            kind, value = await self._receive(worker, timeout)
        except BaseException:
            # Timed out, cancelled or the worker died: its state is unknown, so replace it.
            worker.kill()
            self._all.remove(worker)
            worker = _Worker()
            self._all.append(worker)
            raise
        finally:
            idle.put_nowait(worker)
        if kind == "err":
            raise WorkerError(value)
        return value

    @staticmethod
    async def _receive(worker: _Worker, timeout: float) -> tuple[str, Any]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        fd = worker.conn.fileno()

        def readable() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(done, timeout)
        finally:
            loop.remove_reader(fd)
        try:
            return worker.conn.recv()
        except EOFError:
            raise WorkerError(f"reward worker process died (exit code {worker.process.exitcode})") from None

    def close(self) -> None:
        """Stop every worker (politely, then by force)."""
        for w in self._all:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            w.process.join(timeout=2)
            w.kill()
        self._all = []
        self._idle = None
