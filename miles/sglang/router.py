"""sglang-router in front of the engines (``[sglang] use_router = true``): start it, and decide which engines it routes
to.

Why miles, not the router, decides the membership: after an engine restarts it
serves the checkpoint's weights, not the actor's, until the next weight sync
reaches it. The router cannot know that (it only sees a healthy server), so the
driver starts the router with no workers and keeps its worker list equal to the
engines that hold the last pushed weights:

* before each rollout, :meth:`SglangRouter.route_to` removes every worker that
  is not such an engine (a restarted one, one that left the weight-update group)
  and adds those that are and answer ``/health_generate``;
* during the rollout a watchdog (:meth:`SglangRouter.guard`) removes an engine
  whose port stops accepting connections or that is announced again (it
  restarted), within ``poll_s``: the router retries the requests it had in
  flight there on the others, and never sends one to the restarted server;
* an engine that came back is added again only by the ``route_to`` of a rollout
  after the sync that gave it the actor's weights (:class:`miles.rollout.fleet.EngineFleet`).

What the router carries is ``/generate`` only, one sample per request:
sglang-router 0.3.2 parses the body into its own ``GenerateRequest`` whose
``sampling_params`` is one object and ``text`` one string, so a batch with a
``sampling_params`` list (miles' batched bodies carry each sample's own seed) is
refused with 422 ``Failed to deserialize the JSON body into the target type:
sampling_params[0]: invalid type: map, expected f32``. The weight sync,
``/pause_generation``, ``/continue_generation``, ``/release_memory_occupation``
and ``/resume_memory_occupation`` are not routes of the router (404) and go to
each engine directly, as without a router.

Affinity: a conversation's turns go to one engine, whose prefix cache holds
the conversation so far. miles names each request's conversation in the
``X-SMG-Routing-Key`` header (:data:`ROUTING_KEY_HEADER`: a multi-turn sample's
session, a single-turn prompt's group) and starts the router with its
``manual`` policy, which sends every request of one key to the engine it picked
for the key's first request (``--assignment-mode min_group``: the engine with
the fewest keys, so conversations spread evenly), and picks another only when
that engine leaves the worker list. ``cache_aware`` matches the request's
tokens against what it sent where, but sends a turn elsewhere whenever the
engines' loads differ enough, which in a rollout (every conversation in flight
at once) they do; ``round_robin`` and ``random`` ignore both. A request without
the header goes to a random engine.

The router's own API used here (0.3.2): ``GET /health`` (liveness),
``GET /workers`` (``{"workers": [{"id", "url", "is_healthy", ...}]}``),
``POST /workers`` ``{"url", "api_key"}`` (202; added in the background after the
router's own health check), ``DELETE /workers/{id}`` (202; the id is the UUID
that ``/workers`` lists, not the URL). With ``--api-key`` every route but the
health ones asks the client for that key, which is also the key the router
presents to the workers: the job's engine key protects the router too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from miles.errors import UserError
from miles.job import rundir
from miles.job.ports import free_port
from miles.plan import ports
from miles.plan.engine_argv import keyed_module
from miles.sglang.launcher import EngineLaunch, EngineProcess, EngineStartError, health_ok

if TYPE_CHECKING:
    from miles.job.environment import TaskContext
    from miles.spec.tables import Spec

ROUTER_PIN = "0.3.2"
"""The sglang-router release miles is tested with (``scripts/sglang-env.sh`` installs it beside SGLang)."""

RouterPolicy = Literal["manual", "cache_aware", "round_robin", "random"]

ROUTING_KEY_HEADER = "X-SMG-Routing-Key"
"""The header whose value the router's ``manual`` policy keeps on one engine (a conversation, a prompt's group)."""

MANUAL_ASSIGNMENT = "min_group"
"""How the ``manual`` policy places a key it has not seen (``--assignment-mode``): on the engine with the fewest
keys, so a rollout's conversations spread evenly over the engines (its default, ``random``, may pile them up)."""

START_DEADLINE_S = 120.0
"""The router is a Rust binary: it listens within seconds."""

PER_ENGINE_IN_FLIGHT = 128
MAX_IN_FLIGHT = 512
"""Requests (samples) the client keeps in flight through the router: 128 per routed engine, at most 512 in all
(each is a connection, a file descriptor of the driver)."""


class RouterError(RuntimeError):
    """The router refused or did not carry out a worker change."""


def router_python() -> str:
    """The router's interpreter: SGLang's (``MILES_SGLANG_PYTHON``, where ``scripts/sglang-env.sh`` and the
    ``sglang`` extra put sglang-router), else the one running miles."""
    return os.environ.get("MILES_SGLANG_PYTHON") or sys.executable


def router_version(python: str | None = None) -> str | None:
    """The installed sglang-router version for ``python`` (default: this interpreter), None when it is absent."""
    code = "import sglang_router, importlib.metadata as m; print(m.version('sglang-router'))"
    try:
        probe = subprocess.run([python or sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (probe.stdout.strip() or None) if probe.returncode == 0 else None


def router_available(python: str | None = None) -> bool:
    """Whether sglang-router is installed for ``python``; else miles' client balances the requests itself."""
    return router_version(python) is not None


def require_router(python: str, spec_source: str | None = None) -> str:
    """The router's version for ``python``, or a :class:`UserError` saying how to install it or turn it off."""
    version = router_version(python)
    if version is None:
        where = f" ({spec_source})" if spec_source else ""
        raise UserError(
            f"[sglang] use_router = true{where}, but sglang-router is not installed for {python} "
            "(MILES_SGLANG_PYTHON, else the interpreter running miles). "
            f"Fix: install it there (`{python} -m pip install sglang-router=={ROUTER_PIN}`, or miles' `sglang` extra), "
            "or set [sglang] use_router = false: miles' client then balances the requests over the engines itself "
            "(least outstanding requests)"
        )
    if version != ROUTER_PIN:
        print(f"miles: warning: sglang-router {version} for {python}; miles is tested with {ROUTER_PIN}", flush=True)
    return version


def router_argv(
    worker_urls: Sequence[str] = (),
    *,
    host: str,
    port: int,
    keyed: bool = False,
    policy: RouterPolicy = "manual",
    python: str | None = None,
) -> list[str]:
    """``python -m sglang_router.launch_router``: its ``policy`` (``manual`` places new keys by
    :data:`MANUAL_ASSIGNMENT`), quiet logs (it logs every request at INFO) and a short shutdown grace; ``keyed``: it
    asks clients for the engine key and presents it to the engines, reading it from the environment
    (``miles.plan.engine_argv.KEY_FROM_ENV``), never from its command line."""
    argv = [
        *keyed_module(python or sys.executable, "sglang_router.launch_router", keyed),
        "--host",
        host,
        "--port",
        str(port),
        "--policy",
        policy,
        *(["--assignment-mode", MANUAL_ASSIGNMENT] if policy == "manual" else []),
        "--log-level",
        "warn",
        "--shutdown-grace-period-secs",
        "5",
    ]
    if worker_urls:
        argv += ["--worker-urls", *worker_urls]
    return argv


def router_launch(
    worker_urls: Sequence[str] = (),
    *,
    host: str,
    port: int,
    api_key: str | None,
    log_dir: Path,
    policy: RouterPolicy = "manual",
    python: str | None = None,
) -> EngineLaunch:
    """The router as a process like an engine (index -1, log ``router.log``), in its starter's process group: it
    lives and dies with the driver that uses it."""
    argv = router_argv(worker_urls, host=host, port=port, keyed=api_key is not None, policy=policy, python=python)
    return EngineLaunch(
        index=-1,
        kind="router",
        argv=tuple(argv),
        env={},
        host=host,
        port=port,
        api_key=api_key,
        log_path=log_dir / "router.log",
        own_session=False,
    )


def router_port(task: TaskContext) -> int:
    """The plan's router port (``MILES_ROUTER_PORT`` from the batch script, else the job's port block)."""

    env = os.environ.get("MILES_ROUTER_PORT")
    return int(env) if env else task.master_port + ports.ROUTER_OFFSET - ports.MASTER_OFFSET


def port_open(url: str, timeout: float = 2.0) -> bool:
    """Whether ``url``'s port accepts a TCP connection: a killed server refuses at once, however loaded a live one is
    (``/health_generate`` waits behind the running batch, so it cannot tell a busy engine from a dead one)."""
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=timeout):
            return True
    except OSError:
        return False


class SglangRouter:
    """A running sglang-router: its process (when miles started it) and the worker list miles keeps on it."""

    def __init__(self, url: str, api_key: str | None, process: EngineProcess | None = None) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.process = process
        self.removed: list[str] = []
        """Workers the watchdog took out, in order (for logs and tests)."""

    @classmethod
    def start(
        cls, launch: EngineLaunch, *, extra_env: dict[str, str] | None = None, deadline_s: float = START_DEADLINE_S
    ) -> SglangRouter:
        """Start the router process and wait until it listens; :class:`EngineStartError` quotes its log."""
        router = cls(launch.url, launch.api_key, EngineProcess(launch, extra_env))
        router._start_process(deadline_s)
        return router

    def _start_process(self, deadline_s: float) -> None:
        assert self.process is not None
        self.process.stop(timeout_s=5)
        self.process.start()
        t0 = time.monotonic()
        while not self._live():
            if not self.process.alive() or time.monotonic() - t0 > deadline_s:
                self.process.stop(timeout_s=5)
                raise EngineStartError(
                    f"sglang-router at {self.url} did not start within {deadline_s:.0f} s; last "
                    f"lines of {self.process.launch.log_path}:\n{self.process.log_tail()}"
                )
            time.sleep(0.2)

    def _live(self) -> bool:
        try:
            self._call("GET", "/health", timeout=2)
            return True
        except (RouterError, OSError):
            return False

    def _call(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        req = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise RouterError(
                f"sglang-router {method} {path} answered {e.code}: {e.read().decode(errors='replace')[:300]}"
            ) from e
        except (urllib.error.URLError, OSError) as e:
            raise RouterError(f"sglang-router at {self.url} unreachable ({method} {path}): {e}") from e
        text = raw.decode(errors="replace")
        return json.loads(text) if text.lstrip().startswith(("{", "[")) else text

    # ------------------------------------------------------------------ workers

    def _listed(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/workers").get("workers", []))

    def workers(self) -> dict[str, str]:
        """The router's workers: URL -> the router's worker id."""
        return {str(w["url"]).rstrip("/"): str(w["id"]) for w in self._listed()}

    def loads(self) -> dict[str, int]:
        """Requests the router has in flight on each worker: URL -> count."""
        return {str(w["url"]).rstrip("/"): int(w.get("load") or 0) for w in self._listed()}

    def add(self, url: str, deadline_s: float = 60.0) -> None:
        """Add ``url`` and wait until the router lists it (it health-checks the engine first)."""
        url = url.rstrip("/")
        body: dict[str, Any] = {"url": url}
        if self.api_key:
            body["api_key"] = self.api_key
        self._call("POST", "/workers", body)
        end = time.monotonic() + deadline_s
        while url not in self.workers():
            if time.monotonic() > end:
                raise RouterError(
                    f"sglang-router did not add {url} within {deadline_s:.0f} s; see "
                    + (str(self.process.launch.log_path) if self.process else "the router's log")
                )
            time.sleep(0.1)

    def remove(self, url: str, deadline_s: float = 30.0) -> None:
        """Remove ``url`` (nothing when it is not a worker) and wait until the router no longer lists it."""
        url = url.rstrip("/")
        end = time.monotonic() + deadline_s
        while (worker_id := self.workers().get(url)) is not None:
            if time.monotonic() > end:
                raise RouterError(f"sglang-router still routes to {url} {deadline_s:.0f} s after its removal")
            self._call("DELETE", f"/workers/{worker_id}")
            time.sleep(0.05)

    def route_to(self, urls: Sequence[str]) -> list[str]:
        """Make the router's workers exactly the engines of ``urls`` that answer ``/health_generate``; those it
        routes to now. Restarts the router first if its process died."""
        if self.process is not None and not self._live():
            print(f"miles: sglang-router at {self.url} is down; starting it again", flush=True)
            self._start_process(START_DEADLINE_S)
        wanted = [u.rstrip("/") for u in urls]
        current = self.workers()
        for url in sorted(current):
            if url not in wanted or not port_open(url):  # a dead one is added again once it answers
                self.remove(url)
        current = self.workers()
        for url in wanted:
            if url not in current and health_ok(url, self.api_key, timeout=30):
                self.add(url)
        routed = [u for u in wanted if u in self.workers()]
        if not routed:
            raise RuntimeError(f"sglang-router at {self.url}: none of the engines {wanted} is healthy")
        return routed

    @contextmanager
    def guard(
        self, urls: Sequence[str], stale: Callable[[], Iterable[str]] = lambda: (), poll_s: float = 0.5
    ) -> Iterator[None]:
        """While the block runs, and once more when it ends, remove a worker of ``urls`` whose port closed or that
        ``stale`` names (an engine announced again: restarted, with the checkpoint's weights)."""
        watched = [u.rstrip("/") for u in urls]
        stop = threading.Event()

        def sweep() -> None:
            try:
                gone = {u.rstrip("/") for u in stale()}
                for url in list(watched):
                    if url in gone or not port_open(url):
                        self.remove(url)
                        watched.remove(url)
                        self.removed.append(url)
                        print(
                            f"miles: sglang-router: engine {url} is down or restarted; routing around it "
                            "until a weight sync gives it the actor's weights",
                            flush=True,
                        )
            except (RouterError, OSError) as e:  # the next sweep tries again
                print(f"miles: sglang-router watchdog: {e}", flush=True)

        def watch() -> None:
            while not stop.wait(poll_s):
                sweep()

        thread = threading.Thread(target=watch, name="router-watchdog", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=60)
            sweep()

    def close(self) -> None:
        if self.process is not None:
            self.process.stop(timeout_s=10)


def driver_router_launch(spec: Spec, port: int, api_key: str | None, run_dir: Path, python: str) -> EngineLaunch:
    """The driver's router process: every interface at ``port``, ``[sglang] router_policy``, no workers yet."""
    return router_launch(
        host="0.0.0.0",
        port=port,
        api_key=api_key,
        log_dir=run_dir / rundir.LOGS,
        policy=spec.sglang.router_policy,
        python=python,
    )


def start_driver_router(spec: Spec, task: TaskContext, api_key: str | None) -> SglangRouter:
    """The driver's router: on its node at the plan's router port (a free one if that is taken), no workers yet,
    logging to ``<run_dir>/logs/router.log``. :class:`UserError` when sglang-router is not installed."""

    python = router_python()
    require_router(python, spec.source)
    launch = driver_router_launch(spec, free_port(router_port(task)), api_key, Path(task.run_dir), python)
    router = SglangRouter.start(launch)
    print(f"miles: sglang-router {spec.sglang.router_policy} at {router.url} (log {launch.log_path})", flush=True)
    return router
