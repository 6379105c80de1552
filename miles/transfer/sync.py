"""Weight sync, trainer rank 0 -> every engine, through SGLang's HTTP protocol.

One :class:`WeightSync` lives on the sending trainer rank (rank 0; one per PP
stage when stages own disjoint weights). ``connect`` forms the weight-update
group: engine ``i`` is told over ``/init_weights_update_group`` to join with
ranks from ``1 + i * ranks_per_engine`` (one per TP rank) while this process joins as rank 0 (:mod:`miles.transfer.group`
builds the group exactly as SGLang does). ``sync`` then streams the actor's
HF-named full tensors in flattened buckets of ``bucket_bytes``: for each bucket
every engine is sent ``/update_weights_from_distributed`` (names, dtypes,
shapes, ``load_format = "flattened_bucket"``) and, while those requests wait in
the engines, this rank broadcasts the bucket's bytes. Around the sync the
engines are paused (``/pause_generation``) and continued, the last bucket
carries the new ``weight_version``, and caches are flushed after.

The same calls drive a real SGLang server (H7's conformance tests run it), so the
embedded engine and SGLang share one sender.

Callers on other trainer ranks must still drain the actor's tensor iterator when
producing a full tensor is a collective (FSDP ``full_tensor``): only rank 0 calls
``sync``; the others iterate and drop.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from miles.rollout import sglang_protocol as proto
from miles.transfer.bucket import Bucket, buckets
from miles.transfer.group import join_group, leave_group

DEFAULT_GROUP = "miles_weight_update"


class SyncError(RuntimeError):
    """An engine refused or failed a step of the weight sync; the message names the engine and step."""


@dataclass(frozen=True)
class SyncStats:
    """What one sync moved and how long it took."""

    seconds: float
    bytes: int
    buckets: int
    tensors: int
    weight_version: str

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def _lookahead(it: Iterator[Bucket]) -> Iterator[tuple[Bucket, bool]]:
    """Yield (bucket, is_last), so the last bucket can carry the weight version."""
    prev: Bucket | None = None
    for b in it:
        if prev is not None:
            yield prev, False
        prev = b
    if prev is not None:
        yield prev, True


class WeightSync:
    """The sending side of the weight-update group (trainer rank 0)."""

    def __init__(
        self,
        engine_urls: Sequence[str],
        master_address: str,
        master_port: int,
        backend: str = "gloo",
        bucket_bytes: int = 512 * 1024 * 1024,
        group_name: str = DEFAULT_GROUP,
        api_key: str | None = None,
        device: str | torch.device = "cpu",
        timeout_s: float = 600.0,
        pause_mode: proto.PauseMode = "abort",
        ranks_per_engine: int = 1,
    ) -> None:
        if not engine_urls:
            raise ValueError("weight sync needs at least one engine URL")
        self.engine_urls = [u.rstrip("/") for u in engine_urls]
        self.master_address = master_address
        self.master_port = master_port
        self.backend = backend
        self.bucket_bytes = bucket_bytes
        self.group_name = group_name
        self.api_key = api_key
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.pause_mode = pause_mode
        self.ranks_per_engine = ranks_per_engine
        """An SGLang engine joins with one rank per TP rank (``[sglang] rollout_num_gpus_per_engine``)."""
        self.group: Any = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max(2, len(self.engine_urls)), thread_name_prefix="miles-sync")

    # ------------------------------------------------------------------ HTTP

    def _post(self, url: str, path: str, body: dict[str, Any] | None) -> Any:
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(url + path, data=data, method="POST", headers={"Content-Type": "application/json"})
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise SyncError(f"{url}{path} answered {e.code}: {detail}") from e
        except (urllib.error.URLError, OSError) as e:
            raise SyncError(f"{url}{path} failed: {e}") from e
        if not raw:
            return None
        try:
            result = json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")
        if isinstance(result, dict) and result.get("success") is False:
            raise SyncError(f"{url}{path}: {result.get('message')}")
        return result

    def _post_all(self, path: str, body: dict[str, Any] | None = None) -> list[concurrent.futures.Future]:
        return [self._pool.submit(self._post, url, path, body) for url in self.engine_urls]

    @staticmethod
    def _wait(futures: list[concurrent.futures.Future]) -> list[Any]:
        results, errors = [], []
        for f in futures:
            try:
                results.append(f.result())
            except SyncError as e:
                errors.append(str(e))
        if errors:
            raise SyncError("; ".join(errors))
        return results

    # ------------------------------------------------------------------ group

    def connect(self) -> None:
        """Form the weight-update group with every engine (blocks until all joined)."""
        if self.group is not None:
            return
        world = 1 + len(self.engine_urls) * self.ranks_per_engine
        futures = [
            self._pool.submit(self._post, url, proto.INIT_WEIGHTS_UPDATE_GROUP.path, proto.init_weights_update_group_body(
                master_address=self.master_address,
                master_port=self.master_port,
                rank_offset=1 + i * self.ranks_per_engine,
                world_size=world,
                group_name=self.group_name,
                backend="nccl" if self.backend == "nccl" else "gloo",
            ))
            for i, url in enumerate(self.engine_urls)
        ]
        try:
            self.group = join_group(self.master_address, self.master_port, 0, world, self.group_name,
                                    backend=self.backend, timeout_s=self.timeout_s)
        except Exception as e:
            for f in futures:
                f.cancel()
            raise SyncError(f"could not form weight-update group {self.group_name!r} at "
                            f"{self.master_address}:{self.master_port} with {world - 1} engine(s): {e}") from e
        self._wait(futures)

    def close(self) -> None:
        """Leave the group on both sides; engines that are gone are ignored."""
        if self.group is None:
            return
        for f in self._post_all(proto.DESTROY_WEIGHTS_UPDATE_GROUP.path,
                                proto.destroy_weights_update_group_body(group_name=self.group_name)):
            try:
                f.result()
            except SyncError:
                pass
        leave_group(self.group)
        self.group = None
        self._pool.shutdown(wait=False)

    # ------------------------------------------------------------------ sync

    def sync(self, named: Iterable[tuple[str, torch.Tensor]], weight_version: int | str | None = None) -> SyncStats:
        """Send every tensor of ``named`` to every engine; returns what moved and how long it took."""
        if self.group is None:
            self.connect()
        version = "" if weight_version is None else str(weight_version)
        start = time.perf_counter()
        total = count = nbuckets = 0
        pause = self._post_all(proto.PAUSE_GENERATION.path, proto.pause_generation_body(mode=self.pause_mode))
        try:
            # Inside the try: when one engine fails to pause, the others that did are resumed below.
            self._wait(pause)
            for bucket, last in _lookahead(buckets(named, self.bucket_bytes)):
                meta = bucket.metadata()
                body = proto.update_weights_from_distributed_body(
                    names=meta["names"],
                    dtypes=meta["dtypes"],
                    shapes=meta["shapes"],
                    group_name=self.group_name,
                    flattened_bucket=True,
                    flush_cache=last,
                    weight_version=version if last and version else None,
                )
                futures = self._post_all(proto.UPDATE_WEIGHTS_FROM_DISTRIBUTED.path, body)
                flat = bucket.flatten(self.device)
                dist.broadcast(flat, src=0, group=self.group)
                self._wait(futures)
                total += bucket.size
                count += len(bucket.names)
                nbuckets += 1
            self._wait(self._post_all(proto.FLUSH_CACHE.path))
        finally:
            self._wait(self._post_all(proto.CONTINUE_GENERATION.path, proto.continue_generation_body()))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return SyncStats(time.perf_counter() - start, total, nbuckets, count, version)

    def raw_broadcast(self, nbytes: int, iters: int = 3) -> float:
        """Seconds per raw ``dist.broadcast`` of ``nbytes`` from this rank to the same engines, best of ``iters``.

        The reference of ``miles bench sync``: the engines run the same broadcast
        through the miles-only endpoint ``/miles/broadcast_bench`` (embedded engine only).
        """
        if self.group is None:
            self.connect()
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        futures = self._post_all("/miles/broadcast_bench", {"group_name": self.group_name, "nbytes": nbytes,
                                                            "iters": iters})
        best = float("inf")
        for _ in range(iters):
            t0 = time.perf_counter()
            dist.broadcast(buf, src=0, group=self.group)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            best = min(best, time.perf_counter() - t0)
        self._wait(futures)
        return best


def bench(sync: WeightSync, named: list[tuple[str, torch.Tensor]], iters: int = 3) -> dict[str, float]:
    """Sync ``named`` ``iters`` times and compare with a raw broadcast of the same bytes (``miles bench sync``).

    Returns seconds (best sync), bytes, raw_seconds (best raw broadcast of the same
    total), GB/s of both and their ratio (sync speed / raw speed; 1.0 is the link's limit).
    """
    stats = [sync.sync(named, weight_version=f"bench-{i}") for i in range(iters)]
    best = min(stats, key=lambda s: s.seconds)
    raw = sync.raw_broadcast(best.bytes, iters=iters)
    return {
        "seconds": best.seconds,
        "bytes": float(best.bytes),
        "buckets": float(best.buckets),
        "gb_per_s": best.gb_per_s,
        "raw_seconds": raw,
        "raw_gb_per_s": best.bytes / raw / 1e9 if raw > 0 else 0.0,
        "ratio": raw / best.seconds if best.seconds > 0 else 0.0,
    }
