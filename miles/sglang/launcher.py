"""Start, watch and restart the rollout engines: SGLang servers, or the embedded engine with the same launcher.

For each engine of the plan miles runs one server process on the engine's node
with the engine's GPUs (``CUDA_VISIBLE_DEVICES``): for SGLang::

    python -m sglang.launch_server --model-path M --host H --port P --tp-size T
        --api-key K [--mem-fraction-static F] --dtype D --random-seed S [--nccl-port N]
        [every other [sglang] key as --key-with-dashes value]

and for the embedded engine ``python -m miles.engine.server`` with the same
address, key and seed, so both kinds go through one path (start, health wait,
log, restart) and tests exercise that path with either.

Why a supervisor: an engine process can die (OOM, a bad kernel, a node hiccup)
while the trainers are fine. The client retries its requests on the other
engines; the supervisor notices the exit, starts the engine again with the
same command, waits until it is healthy, and reports it (``take_restarted``
and the ``on_restart`` callback) so the weight sync re-forms the
weight-update group with it and pushes the current weights before it serves.

Every ``[sglang]`` pass-through key is checked against the pinned SGLang
release's flag list (``miles/spec/sglang_flags.json``) before anything starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from miles.job import enginekey, orphans
from miles.plan.engine_argv import KEY_ENV, embedded_argv, sglang_argv
from miles.plan.engine_argv import passthrough_args as passthrough_args  # re-exported: the launcher's API
from miles.sglang import protocol as proto
from miles.spec.tables import Spec

EngineKind = Literal["sglang", "embedded"]
ProcessKind = Literal["sglang", "embedded", "router"]

LOG_TAIL_LINES = 40
"""Lines of an engine's log quoted in a start-up error."""


class EngineStartError(RuntimeError):
    """An engine exited or stayed unhealthy during start-up; the message quotes its log tail."""


@dataclass(frozen=True)
class EngineLaunch:
    """Everything needed to (re)start one engine process."""

    index: int
    kind: ProcessKind
    argv: tuple[str, ...]
    env: Mapping[str, str]
    """Variables set on top of the launcher's environment (CUDA_VISIBLE_DEVICES, ...)."""
    host: str
    port: int
    api_key: str | None
    log_path: Path
    advertise_host: str | None = None
    """Address others reach the engine at when ``host`` is a wildcard bind (``0.0.0.0``)."""
    own_session: bool = True
    """Start the process in a session of its own (an engine: it and its workers are stopped as one group). False
    keeps it in the starter's process group, so that whatever stops the starter's group stops it too (the router)."""

    @property
    def url(self) -> str:
        host = self.advertise_host or ("127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host)
        return f"http://{host}:{self.port}"


def engine_env(gpus: Sequence[int], device: str) -> dict[str, str]:
    """Per-engine environment: its GPUs only (SGLang then counts from ``--base-gpu-id 0``).

    No ``gpus`` leaves ``CUDA_VISIBLE_DEVICES`` as the launcher found it (e.g. set by
    ``srun --gpus-per-task``). On CPUs SGLang needs ``SGLANG_USE_CPU_ENGINE=1``.
    """
    env: dict[str, str] = {}
    if device == "cuda" and gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    if device == "cpu":
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    return env


def engine_launch(
    spec: Spec,
    *,
    index: int,
    model_path: str,
    host: str,
    port: int,
    api_key: str | None,
    log_dir: Path,
    gpus: Sequence[int] = (),
    device: str = "cpu",
    tp_size: int | None = None,
    nccl_port: int | None = None,
    python: str | None = None,
    kind: EngineKind | None = None,
) -> EngineLaunch:
    """Engine ``index``: its command (``spec.rollout.engine`` or ``kind``), environment and log file."""
    kind = kind or spec.rollout.engine
    seed = spec.rollout.rollout_seed + index
    if kind == "sglang":
        argv = sglang_argv(
            spec,
            model_path=model_path,
            host=host,
            port=port,
            keyed=api_key is not None,
            tp_size=tp_size,
            seed=seed,
            nccl_port=nccl_port,
            python=python,
            gpu=device == "cuda",
        )
    else:
        argv = embedded_argv(spec, model_path=model_path, host=host, port=port, seed=seed, device=device, python=python)
    return EngineLaunch(
        index=index,
        kind=kind,
        argv=tuple(argv),
        env=engine_env(gpus, device),
        host=host,
        port=port,
        api_key=api_key,
        log_path=log_dir / f"engine-{index}.log",
    )


def plan_launches(
    spec: Spec,
    plan: Any,
    *,
    model_path: str,
    api_key: str | None,
    log_dir: Path,
    host: str = "127.0.0.1",
    python: str | None = None,
    only: Sequence[int] | None = None,
) -> list[EngineLaunch]:
    """One :class:`EngineLaunch` per engine of ``plan`` (a ``miles.plan.model.Plan``), or per index in ``only``."""
    device = "cuda" if plan.device == "gpu" else "cpu"
    return [
        engine_launch(
            spec,
            index=e.index,
            model_path=model_path,
            host=host,
            port=int(plan.ports.engine_http[e.index]),
            api_key=api_key,
            log_dir=log_dir,
            gpus=e.gpus,
            device=device,
            tp_size=e.tp,
            nccl_port=plan.ports.engine_nccl[e.index] if plan.ports.engine_nccl else None,
            python=python,
        )
        for e in plan.engines
        if only is None or e.index in only
    ]


def health_ok(url: str, api_key: str | None = None, timeout: float = 5.0) -> bool:
    """Whether ``/health_generate`` answers 200: the server generated a token, not merely listens."""
    req = urllib.request.Request(url + proto.HEALTH_GENERATE.path, method=proto.HEALTH_GENERATE.method)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return int(r.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class EngineProcess:
    """One engine server process: start it, wait until healthy, stop it, read its log."""

    def __init__(self, launch: EngineLaunch, extra_env: Mapping[str, str] | None = None) -> None:
        self.launch = launch
        self.extra_env = dict(extra_env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._copier: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.launch.url

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the process (own session, so it and SGLang's scheduler children stop together); it dies with
        the process that starts it (:mod:`miles.job.orphans`), and the key is kept out of its log."""

        if self.alive():
            raise RuntimeError(f"engine {self.launch.index} is already running (pid {self.pid})")
        self.launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.launch.env, **self.extra_env}
        env.pop(KEY_ENV, None)
        if self.launch.api_key:  # in the environment, never on the command line (miles.plan.engine_argv)
            env[KEY_ENV] = self.launch.api_key
        self.starts += 1
        with open(self.launch.log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            what = "the router" if self.launch.kind == "router" else f"engine {self.launch.index}"
            shown = enginekey.redact(" ".join(self.launch.argv), self.launch.api_key)
            log.write(f"\n===== miles: start {self.starts} of {what} at {stamp}: {shown}\n".encode())
            log.flush()
            key = self.launch.api_key
            self.proc = subprocess.Popen(
                list(self.launch.argv),
                stdout=subprocess.PIPE if key else log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=self.launch.own_session,
                preexec_fn=orphans.die_with_parent(),
            )
        if key:
            assert self.proc.stdout is not None
            self._copier = threading.Thread(
                target=enginekey.copy_redacted,
                name=f"engine-{self.launch.index}-log",
                args=(self.proc.stdout, self.launch.log_path, key),
                daemon=True,
            )
            self._copier.start()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self._copier is not None and not self.alive():
            self._copier.join(timeout=2)  # the last lines of an exited server
        try:
            with open(self.launch.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_healthy(self, deadline_s: float, poll_s: float = 0.5, cancel: threading.Event | None = None) -> float:
        """Block until ``/health_generate`` is 200; seconds it took. Raises :class:`EngineStartError`, also
        when ``cancel`` is set (the task is stopping: a restart in progress must not hold it up)."""
        t0 = time.monotonic()
        while True:
            if cancel is not None and cancel.is_set():
                raise EngineStartError(f"engine {self.launch.index}: start cancelled")
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise EngineStartError(
                    f"engine {self.launch.index} ({self.launch.kind}) exited with code {code} while starting; "
                    f"last lines of {self.launch.log_path}:\n{self.log_tail()}"
                )
            if health_ok(self.url, self.launch.api_key):
                return time.monotonic() - t0
            if time.monotonic() - t0 > deadline_s:
                raise EngineStartError(
                    f"engine {self.launch.index} ({self.launch.kind}) at {self.url} not healthy after "
                    f"{deadline_s:.0f} s; last lines of {self.launch.log_path}:\n{self.log_tail()}"
                )
            time.sleep(poll_s)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the engine's whole process group (the server and the workers it spawned), or to the
        process alone when it shares its starter's group."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                if self.launch.own_session:
                    os.killpg(self.proc.pid, sig)
                else:
                    self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout_s``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(timeout=timeout_s)
        if not self.launch.own_session:
            return
        try:  # workers that outlived their parent still belong to its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class Supervisor:
    """Restarts engines that exit, waits until they are healthy, and reports them for the weight-group rejoin."""

    engines: Sequence[EngineProcess]
    health_deadline_s: float = 600.0
    poll_s: float = 0.5
    max_restarts: int = 3
    """Per engine; past it the engine stays down and ``failed`` says why."""
    on_restart: Callable[[EngineProcess], None] | None = None
    """Called (in the supervisor thread) after a restarted engine is healthy, before it is reported."""
    failed: dict[int, str] = field(default_factory=dict)
    restarts: dict[int, int] = field(default_factory=dict)
    _restarted: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    restarted_event: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching, cancelling a restart in progress (engines are left as they are; stop them separately)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.health_deadline_s + 5)

    def take_restarted(self) -> list[int]:
        """Indices of engines restarted since the last call: they must rejoin the weight-update group."""
        with self._lock:
            out, self._restarted = self._restarted, []
            self.restarted_event.clear()
            return out

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            for eng in self.engines:
                idx = eng.launch.index
                if eng.alive() or idx in self.failed or self._stop.is_set():
                    continue
                code = eng.proc.returncode if eng.proc is not None else None
                count = self.restarts.get(idx, 0)
                if count >= self.max_restarts:
                    self.failed[idx] = f"engine {idx} exited (code {code}) after {count} restarts:\n{eng.log_tail()}"
                    continue
                self.restarts[idx] = count + 1
                try:
                    eng.stop(timeout_s=5)  # reap the group of the dead server
                    eng.start()
                    eng.wait_healthy(self.health_deadline_s, cancel=self._stop)
                except EngineStartError as e:
                    if not self._stop.is_set():
                        self.failed[idx] = str(e)
                    continue
                if self.on_restart is not None:
                    self.on_restart(eng)
                with self._lock:
                    self._restarted.append(idx)
                    self.restarted_event.set()


def start_engines(
    launches: Sequence[EngineLaunch],
    *,
    health_deadline_s: float = 600.0,
    extra_env: Mapping[str, str] | None = None,
) -> list[EngineProcess]:
    """Start every engine at once, then wait for all to be healthy; on any failure stop all and raise."""
    engines = [EngineProcess(launch, extra_env) for launch in launches]
    try:
        for eng in engines:
            eng.start()
        for eng in engines:
            eng.wait_healthy(health_deadline_s)
    except BaseException:
        for eng in engines:
            eng.stop(timeout_s=5)
        raise
    return engines


def engine_python(kind: EngineKind) -> str:
    """The interpreter of an engine server: ``MILES_SGLANG_PYTHON`` for SGLang, which usually lives in an
    environment of its own; otherwise the one running miles (``[slurm] python`` in a job, the shell's in
    ``miles run``)."""
    if kind == "sglang" and os.environ.get("MILES_SGLANG_PYTHON"):
        return os.environ["MILES_SGLANG_PYTHON"]
    return sys.executable
