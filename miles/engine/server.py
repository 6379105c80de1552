"""The embedded engine's HTTP server: SGLang 0.5.20's endpoints and JSON bodies.

The trainer talks to an embedded engine exactly as it talks to an SGLang server
(``sglang/srt/entrypoints/http_server.py``): same paths, methods, request
fields (``sglang/srt/managers/io_struct.py``) and response bodies. Served:

====================================  ===========  =====================================================
path                                  methods      body -> answer
====================================  ===========  =====================================================
/health, /health_generate, /ready     GET          200 empty (503 while not serving)
/get_model_info, /model_info          GET          model_path, weight_version, architectures, ...
/get_server_info, /server_info        GET          the server's settings and version
/generate                             POST, PUT    GenerateReqInput -> {text, output_ids, meta_info} (list if batched)
/flush_cache                          GET, POST    200 text
/init_weights_update_group            POST         InitWeightsUpdateGroupReqInput -> {success, message}
/destroy_weights_update_group         POST         DestroyWeightsUpdateGroupReqInput -> {success, message}
/update_weights_from_distributed      POST         UpdateWeightsFromDistributedReqInput -> {success, message}
/update_weights_from_tensor           POST         UpdateWeightsFromTensorReqInput (flattened_bucket) -> {success,
message}
/update_weights_from_disk             POST         UpdateWeightFromDiskReqInput -> {success, message,
num_paused_requests}
/update_weight_version                POST         {new_version} -> {success, message, new_version}
/get_weights_by_name                  GET, POST    {name, truncate_size} -> the tensor as nested float lists
/weights_checker                      GET, POST    {action: "checksum"} -> {success, message, ranks,
per_engine_checksum}
/release_memory_occupation            GET, POST    {tags} -> null
/resume_memory_occupation             GET, POST    {tags} -> null
/pause_generation                     POST         {mode: abort|retract|in_place} -> {message, status}
/continue_generation                  POST         {} -> {message, status}
/abort_request                        POST         {rid, abort_all} -> 200
/miles/broadcast_bench                POST         miles only: {group_name, nbytes, iters} raw broadcasts -> {success}
====================================  ===========  =====================================================

With ``api_key`` set, every path but /health*, /ready and /metrics needs
``Authorization: Bearer <key>`` (SGLang's ``--api-key``); a wrong key gets 401
``{"error": "Unauthorized"}``.

This module holds the routes, the request queue and the batcher; ``/generate``'s body is read and its answer
written by :mod:`miles.engine.generate_body`, and the weight routes are :mod:`miles.engine.weight_endpoints`'s.

Batching: single-prompt requests that arrive within ``batch_wait_ms`` of each
other are generated as one batch (up to ``max_batch_size``); a batched request
(a list of prompts) is generated as one batch on its own, so a client that sends
fixed chunks gets the same numbers on every run.

Entry points (the engine launcher calls :func:`serve` for the engine role; keep it stable)::

    serve(model_dir, host="127.0.0.1", port=30000, device="cpu", dtype="float32", seed=0,
          api_key=None, max_batch_size=64, batch_wait_ms=5.0, served_model_name=None,
          weight_version="default", trust_remote_code=False, ready_file=None) -> None   # blocks

    python -m miles.engine.server --model DIR --port N [--host H] [--device cpu|cuda]
           [--dtype float32|bfloat16|float16] [--seed S] [--api-key K] [--max-batch-size B]
           [--batch-wait-ms MS] [--ready-file PATH]

``ready_file``: once the server listens, ``http://host:port`` is written there
atomically (how an engine announces itself in the run directory).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from miles.engine.core import Engine, EngineReleased, GenerationOutput, GenerationRequest
from miles.engine.generate_body import aborted_in_queue, answer_body, read_generate
from miles.engine.sampling import SamplingError, SamplingParams
from miles.engine.weight_endpoints import WeightEndpoints, json_error
from miles.plan.engine_argv import KEY_ENV

log = logging.getLogger("miles.engine.server")

OPEN_PATHS = ("/health", "/ready", "/metrics")
"""Prefixes SGLang serves without an API key (probes and scrapers carry no secrets)."""


class _RecordingBody(dict):
    """A request body that notes every field name read from it.

    The conformance test (tests/unit/engine/test_server_bodies.py) asserts that every
    field the server reads is a field of SGLang's request class for that endpoint.
    """

    def __init__(self, data: dict[str, Any], seen: set[str]) -> None:
        super().__init__(data)
        self.seen = seen

    def __getitem__(self, key: str) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.seen.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.seen.add(key)
        return super().__contains__(key)


@dataclass
class _Pending:
    requests: list[GenerationRequest]
    future: asyncio.Future
    batched: bool
    rids: list[str] = field(default_factory=list)


class EngineServer(WeightEndpoints):
    """Request queue, batcher and control state around one :class:`Engine`; weight routes come from the mixin."""

    def __init__(
        self,
        engine: Engine,
        api_key: str | None = None,
        batch_wait_ms: float = 5.0,
        served_model_name: str | None = None,
        weight_version: str = "default",
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.engine = engine
        self.api_key = api_key
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.served_model_name = served_model_name or engine.model_dir
        self.weight_version = weight_version
        self.settings = dict(settings or {})
        self.groups: dict[str, Any] = {}
        self.fields_read: dict[str, set[str]] = {}
        """Request-body fields read per path (see :class:`_RecordingBody`)."""
        self.paused = False
        self.busy = False
        self._queue: list[_Pending] = []
        self._running: list[str] = []
        """Request ids of the batch being generated, in the engine's request order (for abort by rid)."""
        self._wakeup: asyncio.Event | None = None
        self._unpaused: asyncio.Event | None = None
        self._model_lock: asyncio.Lock | None = None
        # The CUDA current device is per thread: bind the worker threads to the engine's GPU, or NCCL groups
        # they form (weight updates) land on GPU 0 whatever the engine's device is.
        bind = _device_binder(getattr(engine, "device", None))
        self._gen_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="miles-generate", initializer=bind)
        self._ctl_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="miles-control", initializer=bind)
        self._worker: asyncio.Task | None = None

    # ------------------------------------------------------------------ app

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=1 << 30)
        r = app.router
        for path in ("/health", "/health_generate"):
            r.add_get(path, self.health)
        r.add_get("/ready", self.ready)
        for path in ("/get_model_info", "/model_info"):
            r.add_get(path, self.model_info)
        for path in ("/get_server_info", "/server_info"):
            r.add_get(path, self.server_info)
        r.add_post("/generate", self.generate)
        r.add_put("/generate", self.generate)
        for method in ("GET", "POST"):
            r.add_route(method, "/flush_cache", self.flush_cache)
            r.add_route(method, "/get_weights_by_name", self.get_weights_by_name)
            r.add_route(method, "/weights_checker", self.weights_checker)
            r.add_route(method, "/release_memory_occupation", self.release_memory)
            r.add_route(method, "/resume_memory_occupation", self.resume_memory)
        r.add_post("/init_weights_update_group", self.init_group)
        r.add_post("/destroy_weights_update_group", self.destroy_group)
        r.add_post("/update_weights_from_distributed", self.update_from_distributed)
        r.add_post("/update_weights_from_tensor", self.update_from_tensor)
        r.add_post("/update_weights_from_disk", self.update_from_disk)
        r.add_post("/update_weight_version", self.update_weight_version)
        r.add_post("/pause_generation", self.pause)
        r.add_post("/continue_generation", self.resume_generation)
        r.add_post("/abort_request", self.abort_request)
        r.add_post("/miles/broadcast_bench", self.broadcast_bench)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self._wakeup = asyncio.Event()
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._model_lock = asyncio.Lock()
        self._worker = asyncio.create_task(self._batch_loop())

    async def _stop(self, app: web.Application) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self.engine.gate.set()
        self._gen_pool.shutdown(wait=False, cancel_futures=True)
        self._ctl_pool.shutdown(wait=False, cancel_futures=True)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.api_key and not request.path.startswith(OPEN_PATHS):
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token, self.api_key):
                return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        """The JSON body, recording which fields the handler reads (checked against SGLang's classes in tests)."""
        data = await request.json() if request.can_read_body else None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="request body must be a JSON object")
        return _RecordingBody(data, self.fields_read.setdefault(request.path, set()))

    # ------------------------------------------------------------------ health and info

    async def health(self, request: web.Request) -> web.Response:
        if self.engine.released or self.paused or self.busy or self._queue:
            return web.Response(status=200)
        probe = GenerationRequest([0], SamplingParams(max_new_tokens=1, temperature=0.0))
        try:
            await asyncio.wait_for(self._submit([probe], batched=False), timeout=20.0)
        except Exception as e:  # a probe that fails is exactly what the endpoint reports
            log.error("health_generate failed: %s", e)
            return web.Response(status=503)
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def model_info(self, request: web.Request) -> web.Response:
        cfg = self.engine.config
        return web.json_response(
            {
                "model_path": self.engine.model_dir,
                "served_model_name": self.served_model_name,
                "tokenizer_path": self.engine.model_dir,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": self.weight_version,
                "load_format": "auto",
                "reasoning_parser": None,
                "tool_call_parser": None,
                "has_image_understanding": False,
                "has_audio_understanding": False,
                "model_type": getattr(cfg, "model_type", None),
                "architectures": getattr(cfg, "architectures", None),
            }
        )

    async def server_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                **self.settings,
                "model_path": self.engine.model_dir,
                "served_model_name": self.served_model_name,
                "weight_version": self.weight_version,
                "max_batch_size": self.engine.max_batch_size,
                "version": "miles-embedded",
                "internal_states": [{"paused": self.paused, "released": sorted(self.engine.released)}],
            }
        )

    # ------------------------------------------------------------------ generation

    async def generate(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            reqs, batched, rids, want_lp = read_generate(body, self.engine.encode)
        except (SamplingError, ValueError, TypeError) as e:
            return json_error(str(e))
        arrived = time.perf_counter()
        try:
            outs = await self._submit(reqs, batched=batched, rids=rids)
        except (ValueError, EngineReleased) as e:
            return json_error(str(e))
        latency = time.perf_counter() - arrived
        bodies = [
            answer_body(o, r, rid, lp, latency, self.weight_version)
            for o, r, rid, lp in zip(outs, reqs, rids, want_lp, strict=True)
        ]
        return web.json_response(bodies if batched else bodies[0])

    async def _submit(
        self, reqs: list[GenerationRequest], batched: bool, rids: list[str] | None = None
    ) -> list[GenerationOutput]:
        assert self._wakeup is not None
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(reqs, future, batched, list(rids or [])))
        self._wakeup.set()
        return await future

    async def _batch_loop(self) -> None:
        """Take queued requests, group single prompts, generate one batch at a time."""
        assert self._wakeup is not None and self._unpaused is not None and self._model_lock is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while True:
                await self._unpaused.wait()
                if self._queue and not self._queue[0].batched and self.batch_wait_s > 0:
                    await asyncio.sleep(self.batch_wait_s)
                if not self._queue:
                    break
                if self.paused:  # paused while collecting
                    continue
                group = [self._queue.pop(0)]
                if not group[0].batched:
                    size = 1
                    while self._queue and not self._queue[0].batched and size < self.engine.max_batch_size:
                        group.append(self._queue.pop(0))
                        size += 1
                reqs = [r for p in group for r in p.requests]
                async with self._model_lock:
                    self.busy = True
                    self._running = [rid for p in group for rid in p.rids]
                    self.engine.cancelled = set()
                    try:
                        outs = await loop.run_in_executor(self._gen_pool, self.engine.generate, reqs)
                    except Exception as e:  # the error belongs to these requests, the server lives on
                        for p in group:
                            if not p.future.done():
                                p.future.set_exception(
                                    e if isinstance(e, (ValueError, EngineReleased)) else ValueError(str(e))
                                )
                        continue
                    finally:
                        self.busy = False
                        self._running = []
                start = 0
                for p in group:
                    if not p.future.done():
                        p.future.set_result(outs[start : start + len(p.requests)])
                    start += len(p.requests)

    def _abort_queued(self, rid: str | None = None) -> int:
        """Answer queued requests (all, or those of ``rid``) with finish_reason abort, as SGLang does."""
        kept, aborted = [], 0
        for p in self._queue:
            if rid is None or rid in p.rids:
                aborted += 1
                if not p.future.done():
                    p.future.set_result([aborted_in_queue() for _ in p.requests])
            else:
                kept.append(p)
        self._queue[:] = kept
        return aborted

    # ------------------------------------------------------------------ control

    async def flush_cache(self, request: web.Request) -> web.Response:
        # KV caches live for one batch only: nothing outlives a request, so a flush always succeeds. It is also
        # the sync's "weights are in" point for some callers: the copies of a distributed update finish first.
        await self._settled()
        return web.Response(
            text="Cache flushed.\nPlease check backend logs for more details. "
            "(When there are running or waiting requests, the operation will not be performed.)\n"
        )

    async def pause(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        mode = body.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            return json_error(f"mode must be abort, retract or in_place, got {mode!r}")
        assert self._unpaused is not None and self._model_lock is not None
        self.paused = True
        self._unpaused.clear()
        if mode == "abort":
            self._abort_queued()
            self.engine.abort.set()
            async with self._model_lock:  # the running batch has ended
                self.engine.abort.clear()
        else:  # park the generating thread at its next step; its KV cache is kept
            self.engine.gate.clear()
            loop = asyncio.get_running_loop()
            while self.busy and not self.engine.parked.is_set():
                await loop.run_in_executor(self._ctl_pool, self.engine.parked.wait, 0.05)
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def resume_generation(self, request: web.Request) -> web.Response:
        await self._body(request)
        await self._settled()  # a sync's last copies into the model are done before generation reads it
        assert self._unpaused is not None
        self.paused = False
        self.engine.gate.set()
        self._unpaused.set()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if body.get("abort_all"):
            self._abort_queued()
            self.engine.abort.set()
            assert self._model_lock is not None
            async with self._model_lock:
                self.engine.abort.clear()
        elif body.get("rid"):
            rid = str(body["rid"])
            self._abort_queued(rid)
            if rid in self._running:  # running: its row stops at the engine's next step
                self.engine.cancelled.add(self._running.index(rid))
        return web.Response(status=200)

    async def release_memory(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        await self._settled()
        assert self._model_lock is not None
        async with self._model_lock:
            self.engine.release(body.get("tags"))
            self._host_buffer = None
        return web.json_response(None)

    async def resume_memory(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self.engine.resume(body.get("tags"))
        return web.json_response(None)


def _write_ready_file(path: str, url: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(url + "\n")
    os.replace(tmp, target)


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 30000,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    api_key: str | None = None,
    max_batch_size: int = 64,
    batch_wait_ms: float = 5.0,
    served_model_name: str | None = None,
    weight_version: str = "default",
    trust_remote_code: bool = False,
    ready_file: str | None = None,
    fuse: bool | None = None,
) -> None:
    """Load ``model_dir`` and serve it on ``host:port`` until SIGINT/SIGTERM (blocking)."""
    engine = Engine(
        model_dir,
        device=device,
        dtype=dtype,
        seed=seed,
        max_batch_size=max_batch_size,
        trust_remote_code=trust_remote_code,
        fuse=fuse,
    )
    server = EngineServer(
        engine,
        api_key=api_key,
        batch_wait_ms=batch_wait_ms,
        served_model_name=served_model_name,
        weight_version=weight_version,
        settings={"host": host, "port": port, "device": device, "dtype": dtype, "random_seed": seed},
    )
    app = server.app()
    url = f"http://{host}:{port}"

    async def announce(app: web.Application) -> None:
        log.info("embedded engine serving %s on %s", model_dir, url)
        if ready_file:
            _write_ready_file(ready_file, url)

    app.on_startup.append(announce)
    # a short shutdown: clients retry what a stopping engine drops, and launchers should not wait on it
    web.run_app(app, host=host, port=port, print=None, handle_signals=True, shutdown_timeout=3.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m miles.engine.server", description="miles' embedded SGLang-compatible engine"
    )
    p.add_argument("--model", "--model-path", dest="model", required=True, help="HF model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", "--random-seed", dest="seed", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get(KEY_ENV))
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--weight-version", default="default")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--ready-file", default=None)
    p.add_argument(
        "--fuse",
        choices=["auto", "on", "off"],
        default=os.environ.get("MILES_ENGINE_FUSE", "auto"),
        help="compile the decode step's elementwise chains and sampling (Triton, CUDA only); auto: where "
        "it can run. Default from MILES_ENGINE_FUSE, else auto",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    serve(
        a.model,
        host=a.host,
        port=a.port,
        device=a.device,
        dtype=a.dtype,
        seed=a.seed,
        api_key=a.api_key,
        max_batch_size=a.max_batch_size,
        batch_wait_ms=a.batch_wait_ms,
        served_model_name=a.served_model_name,
        weight_version=a.weight_version,
        trust_remote_code=a.trust_remote_code,
        ready_file=a.ready_file,
        fuse={"auto": None, "on": True, "off": False}[a.fuse],
    )


def _device_binder(device: Any) -> Any:
    """A thread initializer that makes ``device`` the thread's current CUDA device (no-op off CUDA)."""

    def bind() -> None:
        if device is not None and getattr(device, "type", None) == "cuda" and device.index is not None:
            import torch

            torch.cuda.set_device(device.index)

    return bind


if __name__ == "__main__":
    main()
