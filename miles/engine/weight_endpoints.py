"""The weight routes of the embedded engine's server (SGLang's update/inspect-weights endpoints).

Split from :mod:`miles.engine.server` (which mixes this class into
:class:`~miles.engine.server.EngineServer`) because these routes share one
concern: taking weights from a trainer and showing them back, exactly as SGLang
0.5.20 does (``/init_weights_update_group`` + ``/update_weights_from_distributed``
with the flattened-bucket layout, ``/update_weights_from_tensor`` from a
colocated trainer (:mod:`miles.transfer.colocate`), ``/update_weights_from_disk``,
``/get_weights_by_name``, ``/weights_checker``), plus the miles-only
``/miles/broadcast_bench`` reference of ``miles bench sync``.

Ordering rule (SGLang's): while generation is paused an update is applied at
once; otherwise it waits for the running batch (the server's model lock).

Receive/copy overlap (GPUs, flattened buckets, while paused): NCCL's stream
waits for the compute stream before every collective, so a bucket's copies
into the model on the compute stream would hold back the next bucket's
broadcast. The copies run on a side stream instead, each bucket into a fresh
receive buffer held for the side stream (``record_stream``), at most two
buckets' copies in flight; every later use of the weights (continue, flush,
checks, other updates, the next sync's group teardown) first waits for them
(:meth:`WeightEndpoints._settle_copies`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import threading
from pathlib import Path
from typing import Any

from aiohttp import web

from miles.engine.core import Engine
from miles.transfer.bucket import bucket_bytes, dtype_from_name, unflatten
from miles.transfer.colocate import deserialize_bucket, reconstruct
from miles.transfer.group import join_group, leave_group


def json_error(message: str, status: int = 400) -> web.Response:
    """SGLang's ``_create_error_response`` body."""
    return web.json_response({"error": {"message": message}}, status=status)


class WeightEndpoints:
    """Handlers of the weight routes; needs the attributes below from the server it is mixed into."""

    engine: Engine
    groups: dict[str, Any]
    paused: bool
    weight_version: str
    _model_lock: asyncio.Lock | None
    _ctl_pool: concurrent.futures.ThreadPoolExecutor

    _copy_stream: Any = None
    _copy_events: list[Any] | None = None
    _host_buffer: Any = None
    """The receive buffer of flattened buckets on a CPU engine, kept from bucket to bucket and sync to sync: a
    fresh one is paid in first-touch page faults at every bucket, about as much as the broadcast itself."""
    _copy_lock = threading.Lock()
    """Guards ``_copy_events`` between the control threads (a receive and a settle never interleave in one sync,
    but a misbehaving client could send both at once)."""
    MAX_COPIES_IN_FLIGHT = 2
    """Buckets whose copies into the model may still run while the next one arrives (each holds its buffer)."""

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raise NotImplementedError

    def _settle_copies(self) -> None:
        """Wait until every copy a distributed update left on the side stream is done (host-side)."""
        with self._copy_lock:
            events, self._copy_events = self._copy_events or [], []
        for event in events:
            event.synchronize()

    async def _settled(self) -> None:
        if self._copy_events:
            await asyncio.get_running_loop().run_in_executor(self._ctl_pool, self._settle_copies)

    def _abort_queued(self, rid: str | None = None) -> int:
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def _weights_exclusive(self):  # type: ignore[no-untyped-def]
        """SGLang's rule: while paused update at once, otherwise wait for the running batch."""
        assert self._model_lock is not None
        if self.paused:
            yield
        else:
            async with self._model_lock:
                yield

    async def init_group(self, request: web.Request) -> web.Response:

        body = await self._body(request)
        try:
            name = body.get("group_name", "weight_update_group")
            if name in self.groups:
                raise ValueError(f"group {name!r} already exists; destroy it first")
            rank = int(body["rank_offset"])  # one rank per engine: tp_rank is 0
            pg = await asyncio.get_running_loop().run_in_executor(
                self._ctl_pool,
                join_group,
                str(body["master_address"]),
                int(body["master_port"]),
                rank,
                int(body["world_size"]),
                name,
                str(body.get("backend", "nccl")),
            )
            self.groups[name] = pg
        except Exception as e:
            message = f"Failed to initialize custom process group: {e}."
            return web.json_response({"success": False, "message": message}, status=400)
        return web.json_response({"success": True, "message": "Succeeded to initialize custom process group."})

    async def destroy_group(self, request: web.Request) -> web.Response:

        body = await self._body(request)
        name = body.get("group_name", "weight_update_group")
        if name not in self.groups:
            return web.json_response(
                {"success": False, "message": "The group to be destroyed does not exist."}, status=400
            )
        await self._settled()
        # off the event loop: an NCCL teardown can wait for the trainer's, and the server must keep answering
        await asyncio.get_running_loop().run_in_executor(self._ctl_pool, leave_group, self.groups.pop(name))
        if not self.groups:
            self._host_buffer = None
        return web.json_response({"success": True, "message": "Succeeded to destroy custom process group."})

    def _receive(self, body: dict[str, Any]) -> int:
        """Receive one update from the group's rank 0 and load it (runs in a control thread)."""
        import torch
        import torch.distributed as dist

        names, dtypes, shapes = list(body["names"]), list(body["dtypes"]), [list(s) for s in body["shapes"]]
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError("names, dtypes and shapes must have the same length")
        pg = self.groups[body.get("group_name", "weight_update_group")]
        device = self.engine.device
        if body.get("load_format") == "flattened_bucket" and device.type == "cuda":
            return self._receive_overlapped(pg, names, dtypes, shapes)
        self._settle_copies()
        if body.get("load_format") == "flattened_bucket":
            size = bucket_bytes(dtypes, shapes)
            if device.type == "cpu":  # the model's copies below finish before the next bucket: one buffer serves
                if self._host_buffer is None or self._host_buffer.numel() < size:
                    self._host_buffer = None  # free the small one before allocating the larger
                    self._host_buffer = torch.empty(size, dtype=torch.uint8)
                flat = self._host_buffer[:size]
            else:
                flat = torch.empty(size, dtype=torch.uint8, device=device)
            dist.broadcast(flat, src=0, group=pg)
            named = unflatten(flat, names, dtypes, shapes)
        elif body.get("load_format") in (None, "auto"):
            named = [
                (n, torch.empty(s, dtype=dtype_from_name(d), device=device))
                for n, d, s in zip(names, dtypes, shapes, strict=True)
            ]
            handles = [dist.broadcast(t, src=0, group=pg, async_op=True) for _, t in named]
            for h in handles:
                h.wait()
        else:
            raise ValueError(f"load_format {body.get('load_format')!r} is not supported (flattened_bucket or null)")
        return self.engine.load_weights(named)

    def _receive_overlapped(self, pg: Any, names: list[str], dtypes: list[str], shapes: list[list[int]]) -> int:
        """A flattened bucket on a GPU: broadcast into a fresh buffer, copy into the model on the side stream."""
        import torch
        import torch.distributed as dist

        device = self.engine.device
        with self._copy_lock:
            events, self._copy_events = self._copy_events or [], []
        while len(events) >= self.MAX_COPIES_IN_FLIGHT:  # bounds the receive buffers alive at once
            events.pop(0).synchronize()
        main = torch.cuda.current_stream(device)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        side = self._copy_stream
        flat = torch.empty(bucket_bytes(dtypes, shapes), dtype=torch.uint8, device=device)
        dist.broadcast(flat, src=0, group=pg)  # the compute stream now waits for the bytes, not the copies
        side.wait_stream(main)  # after the broadcast and after any generation step already enqueued
        try:
            with torch.cuda.stream(side):
                count = self.engine.load_weights(unflatten(flat, names, dtypes, shapes))
        finally:  # also when a name is refused half-way: copies already enqueued still read the buffer
            flat.record_stream(side)  # the allocator keeps the buffer until the side stream is done with it
            events.append(side.record_event())
            with self._copy_lock:
                self._copy_events = events + (self._copy_events or [])
        if not self.paused:  # generation may run between buckets: it must see whole copies
            self._settle_copies()
        return count

    async def update_from_distributed(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        name = body.get("group_name", "weight_update_group")
        if name not in self.groups:
            return web.json_response(
                {
                    "success": False,
                    "message": (
                        f"Group {name} not in {list(self.groups)}. Please call `init_weights_update_group` first."
                    ),
                },
                status=400,
            )
        try:
            if body.get("abort_all_requests"):
                self._abort_queued()
            async with self._weights_exclusive():
                await asyncio.get_running_loop().run_in_executor(self._ctl_pool, self._receive, body)
        except Exception as e:
            message = (
                f"Failed to update parameter online: {e}. The full weights of the ModelRunner are "
                "partially updated. Please discard the whole weights."
            )
            return web.json_response({"success": False, "message": message}, status=400)
        message = "Succeeded to update parameter online."
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
            message += f" Weight version updated to {self.weight_version}."
        return web.json_response({"success": True, "message": message})

    async def broadcast_bench(self, request: web.Request) -> web.Response:
        """Receive ``iters`` raw broadcasts of ``nbytes`` (the reference of ``miles bench sync``)."""
        import torch
        import torch.distributed as dist

        body = await self._body(request)
        pg = self.groups.get(body.get("group_name", "weight_update_group"))
        if pg is None:
            return web.json_response({"success": False, "message": "no such weight-update group"}, status=400)

        def receive() -> None:
            buf = torch.empty(int(body["nbytes"]), dtype=torch.uint8, device=self.engine.device)
            for _ in range(int(body.get("iters", 1))):
                dist.broadcast(buf, src=0, group=pg)

        await asyncio.get_running_loop().run_in_executor(self._ctl_pool, receive)
        return web.json_response({"success": True, "message": "ok"})

    def _take_tensors(self, body: dict[str, Any]) -> int:
        """Map the colocated trainer's bucket (shared memory or CUDA IPC), check it against the model, copy it in."""

        entries = body["serialized_named_tensors"]
        if not isinstance(entries, list) or not entries:
            raise ValueError("serialized_named_tensors must be a non-empty list (one entry per TP rank)")
        # Opening an entry releases the reference the sender's serialization took on its memory,
        # so every entry is opened (and dropped) before anything is refused.
        decoded = [deserialize_bucket(e) for e in entries]
        if len(decoded) != 1:
            raise ValueError(f"serialized_named_tensors has {len(entries)} entries but this engine has 1 TP rank")
        if body.get("load_format") != "flattened_bucket":
            raise ValueError(
                f"load_format {body.get('load_format')!r} is not supported by the embedded engine; "
                'send load_format = "flattened_bucket"'
            )
        flat, metadata = decoded.pop()
        named = reconstruct(flat, metadata)
        state = self.engine.state()
        for name, tensor in named:  # all checked before any is copied: a refused bucket changes nothing
            target = state.get(name)
            if target is None:
                raise ValueError(f"weight {name!r} is not a parameter of the engine's model")
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} != engine's {tuple(target.shape)}")
            if tensor.dtype.is_floating_point != target.dtype.is_floating_point:
                raise ValueError(f"weight {name!r}: dtype {tensor.dtype} cannot stand for the engine's {target.dtype}")
        count = self.engine.load_weights(named)
        del named, flat  # drop the mapping of the trainer's memory: the trainer may free it once we answer
        return count

    async def update_from_tensor(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        await self._settled()
        if "serialized_named_tensors" not in body:
            return json_error("serialized_named_tensors is required")
        try:
            if body.get("abort_all_requests"):
                self._abort_queued()
            async with self._weights_exclusive():
                await asyncio.get_running_loop().run_in_executor(self._ctl_pool, self._take_tensors, body)
        except Exception as e:
            return web.json_response(
                {"success": False, "message": f"Failed to update weights from tensor: {e}"}, status=400
            )
        message = "Success"
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
            message += f" Weight version updated to {self.weight_version}."
        return web.json_response({"success": True, "message": message})

    async def update_from_disk(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        await self._settled()

        def load() -> int:
            from safetensors.torch import load_file

            files = sorted(Path(str(body["model_path"])).glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors in {body['model_path']}")
            return sum(self.engine.load_weights(load_file(str(f)).items()) for f in files)

        try:
            async with self._weights_exclusive():
                await asyncio.get_running_loop().run_in_executor(self._ctl_pool, load)
        except Exception as e:
            return web.json_response(
                {"success": False, "message": f"Failed to update weights: {e}.", "num_paused_requests": 0}, status=400
            )
        message = "Succeeded to update model weights."
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
            message += f" Weight version updated to {self.weight_version}."
        return web.json_response({"success": True, "message": message, "num_paused_requests": 0})

    async def update_weight_version(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if "new_version" not in body:
            return json_error("new_version is required")
        if body.get("abort_all_requests", True):
            self._abort_queued()
        await self._settled()
        self.weight_version = str(body["new_version"])
        return web.json_response(
            {
                "success": True,
                "message": f"Weight version updated to {self.weight_version}",
                "new_version": self.weight_version,
            }
        )

    async def get_weights_by_name(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        await self._settled()
        try:
            values = self.engine.get_weights_by_name(str(body["name"]), int(body.get("truncate_size", 100)))
        except Exception as e:
            return json_error(str(e))
        return web.json_response(values)

    async def weights_checker(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        action = body.get("action", "checksum")
        if action != "checksum":
            return web.json_response({"success": False, "message": f"Unsupported action={action!r}"}, status=400)
        await self._settled()
        checksums = self.engine.checksums()
        h = hashlib.sha256()
        for name in sorted(checksums):
            h.update(name.encode())
            h.update(checksums[name].encode())
        per_gpu = h.hexdigest()
        rank = {
            "checksums": checksums,
            "per_gpu_checksum": per_gpu,
            "parallelism_info": {
                "tp_rank": 0,
                "tp_size": 1,
                "dp_rank": 0,
                "dp_size": 1,
                "pp_rank": 0,
                "pp_size": 1,
                "rank": 0,
                "size": 1,
            },
        }
        engine_sum = hashlib.sha256(per_gpu.encode()).hexdigest()
        return web.json_response(
            {"success": True, "message": "Success", "ranks": [rank], "per_engine_checksum": engine_sum}
        )
