"""Weight sync, trainer rank 0 -> every engine, through SGLang's HTTP protocol.

One :class:`WeightSync` lives on the sending trainer rank (rank 0; one per PP
stage when stages own disjoint weights). ``connect`` forms the weight-update
group: engine ``i`` is told over ``/init_weights_update_group`` to join with
ranks from ``1 + i * ranks_per_engine`` (one per TP rank) while this process joins as rank 0
(:mod:`miles.transfer.group`
builds the group exactly as SGLang does). ``sync`` then streams the actor's
HF-named full tensors in flattened buckets of ``bucket_bytes``: for each bucket
every engine is sent ``/update_weights_from_distributed`` (names, dtypes,
shapes, ``load_format = "flattened_bucket"``) and, while those requests wait in
the engines, this rank broadcasts the bucket's bytes. Around the sync the
engines are paused (``/pause_generation``) and continued
(``/continue_generation``) on the same connection, and the last bucket
carries the new ``weight_version`` and ``flush_cache`` (SGLang flushes its
cache when it has applied that bucket: no separate ``/flush_cache`` call).

How it keeps up with the link (the bytes on the wire are the same as one
request-then-broadcast per bucket):

* The update requests of one sync travel pipelined on one keep-alive HTTP/1.1
  connection per engine: request ``k + 1`` is written before the answer to
  ``k`` is read. A server handles the requests of one connection one after the
  other, in order (aiohttp and SGLang's uvicorn both do), so the engine meets
  the broadcasts in bucket order, and it finds its next request already
  waiting instead of paying an HTTP round trip per bucket. At most two buckets
  are unanswered per engine.
* Buckets are flattened into two buffers allocated once per sync and used in
  turn (:class:`Staging`); a bucket whose tensors already lie back to back
  (one contiguous tensor) is sent in place. Bucket ``k + 1`` is gathered and
  flattened while bucket ``k`` is on the wire (``async_op=True``; with NCCL the
  copy runs on the compute stream beside NCCL's own stream, and nothing waits
  on the host until the end of the sync).
* The pause and the continue ride the same pipelined connection, before the
  first and after the last update request: no round trip of their own, and the
  first broadcast starts while the engines are still pausing. The first bucket
  is flattened meanwhile.

The same calls drive a real SGLang server (the SGLang integration tests run it), so the
embedded engine and SGLang share one sender.

Callers on other trainer ranks must still drain the actor's tensor iterator when
producing a full tensor is a collective (FSDP ``full_tensor``): only rank 0 calls
``sync``; the others iterate and drop.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import http.client
import json
import socket
import ssl
import statistics
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from miles.sglang import protocol as proto
from miles.transfer.bucket import Bucket, buckets
from miles.transfer.group import join_group, leave_group

DEFAULT_GROUP = "miles_weight_update"

IDLE_SAFE_S = 2.0
"""Longest gap between two requests on one pipelined connection before it is reopened. SGLang's uvicorn
closes a keep-alive connection idle for 5 s (``timeout_keep_alive``); a request written into a connection
the server is closing is lost, and the broadcast that follows it would wait for an engine that never comes."""


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


class Staging:
    """The two flat buffers one sync flattens its buckets into, in turn.

    Allocated on first use and grown only when a bucket needs more, so a sync
    allocates about ``2 x bucket_bytes`` once instead of a fresh buffer per
    bucket (on a host every fresh buffer is also a round of page faults). Two,
    so that bucket ``k + 1`` is written while bucket ``k`` is still being sent:
    a buffer is reused only after the broadcast that read it was waited for.
    :attr:`WeightSync.keep_buffers` says whether they outlive the sync.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.turn = 0

    def flatten(self, bucket: Bucket) -> torch.Tensor:
        """``bucket``'s bytes on the device: in place when they already are contiguous there, else in a buffer."""
        view = bucket.zero_copy(self.device)
        if view is not None:
            return view
        i, self.turn = self.turn, 1 - self.turn
        buf = self.buffers[i]
        if buf is None or buf.numel() < bucket.size:
            self.buffers[i] = buf = None  # free the small one before allocating the larger
            buf = self.buffers[i] = torch.empty(bucket.size, dtype=torch.uint8, device=self.device)
        return bucket.flatten(self.device, out=buf)


class Channel:
    """One keep-alive HTTP/1.1 connection to an engine on which requests are pipelined.

    ``send`` writes a request without waiting; ``receive`` reads the oldest
    unanswered one's answer (HTTP answers come in request order). urllib cannot
    pipeline, hence this small client: it speaks only what the engines answer
    (JSON bodies with ``Content-Length`` or chunked).
    """

    def __init__(self, url: str, api_key: str | None, timeout_s: float) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SyncError(f"engine URL {url!r} is not http(s)://host:port")
        self.url = url
        self.prefix = parts.path.rstrip("/")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        self.host_header = parts.netloc
        self.api_key = api_key
        try:
            sock = socket.create_connection((parts.hostname, port), timeout=timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if parts.scheme == "https":
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        except OSError as e:
            raise SyncError(f"{url}: cannot connect: {e}") from e
        self.sock = sock
        self.reader = sock.makefile("rb")
        self.pending: collections.deque[str] = collections.deque()
        self.last_send = time.monotonic()

    def send(self, path: str, body: dict[str, Any] | None) -> None:
        data = json.dumps(body or {}).encode()
        head = (
            f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        )
        if self.api_key:
            head += f"Authorization: Bearer {self.api_key}\r\n"
        try:
            self.sock.sendall(head.encode("latin-1") + b"\r\n" + data)
        except OSError as e:
            raise SyncError(f"{self.url}{path} failed: {e}") from e
        self.pending.append(path)
        self.last_send = time.monotonic()

    def receive(self) -> tuple[str, int, bytes]:
        """(path, status, body) of the oldest unanswered request."""
        path = self.pending.popleft()
        try:
            line = self.reader.readline(65537)
            fields = line.decode("latin-1").split(None, 2)
            if len(fields) < 2 or not fields[0].startswith("HTTP/"):
                raise OSError(f"the engine closed the connection or sent no HTTP answer ({line[:80]!r})")
            status = int(fields[1])
            headers = http.client.parse_headers(self.reader)  # type: ignore[arg-type]
            if headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = b""
                while size := int(self.reader.readline(1026).split(b";")[0].strip() or b"0", 16):
                    body += self.reader.read(size)
                    self.reader.readline(3)
                while self.reader.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
            else:
                body = self.reader.read(int(headers.get("Content-Length", "0")))
        except (OSError, ValueError) as e:
            raise SyncError(f"{self.url}{path} failed: {e}") from e
        return path, status, body

    def close(self) -> None:
        for closable in (self.reader, self.sock):
            with contextlib.suppress(OSError):  # a connection the engine already dropped
                closable.close()


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
        keep_buffers: bool | None = None,
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
        self.keep_buffers = self.device.type == "cpu" if keep_buffers is None else keep_buffers
        """Keep the two flattening buffers from one sync to the next (default: on CPUs only). On a host a
        fresh buffer is paid again in page faults at every sync (a third of a sync's time on a loaded
        machine); on a GPU the caching allocator already reuses freed blocks, and memory held between
        syncs is memory the trainer cannot use."""
        self._staging: Staging | None = None
        self.group: Any = None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max(2, len(self.engine_urls)), thread_name_prefix="miles-sync"
        )

    # ------------------------------------------------------------------ HTTP

    def _post(self, url: str, path: str, body: dict[str, Any] | None) -> Any:
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(url + path, data=data, method="POST", headers={"Content-Type": "application/json"})
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            raise SyncError(f"{url}{path} failed: {e}") from e
        return self._decode(url, path, status, raw)

    def _decode(self, url: str, path: str, status: int, raw: bytes) -> Any:
        """An engine's answer as JSON (or text); raises :class:`SyncError` on an HTTP error or ``success: false``."""
        if status >= 400:
            raise SyncError(f"{url}{path} answered {status}: {raw.decode(errors='replace')[:500]}")
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
            self._pool.submit(
                self._post,
                url,
                proto.INIT_WEIGHTS_UPDATE_GROUP.path,
                proto.init_weights_update_group_body(
                    master_address=self.master_address,
                    master_port=self.master_port,
                    rank_offset=1 + i * self.ranks_per_engine,
                    world_size=world,
                    group_name=self.group_name,
                    backend="nccl" if self.backend == "nccl" else "gloo",
                ),
            )
            for i, url in enumerate(self.engine_urls)
        ]
        try:
            self.group = join_group(
                self.master_address,
                self.master_port,
                0,
                world,
                self.group_name,
                backend=self.backend,
                timeout_s=self.timeout_s,
            )
        except Exception as e:
            for f in futures:
                f.cancel()
            raise SyncError(
                f"could not form weight-update group {self.group_name!r} at "
                f"{self.master_address}:{self.master_port} with {world - 1} engine(s): {e}"
            ) from e
        self._wait(futures)

    def close(self) -> None:
        """Leave the group on both sides; engines that are gone are ignored."""
        if self.group is None:
            return
        # Both sides at once: tearing down an NCCL communicator can wait for its peers to tear down theirs,
        # so waiting for the engines' answers before leaving would deadlock.
        answers = self._post_all(
            proto.DESTROY_WEIGHTS_UPDATE_GROUP.path, proto.destroy_weights_update_group_body(group_name=self.group_name)
        )
        leave_group(self.group)
        for f in answers:
            try:
                f.result()
            except SyncError:
                pass
        self.group = None
        self._staging = None
        self._pool.shutdown(wait=False)

    # ------------------------------------------------------------------ sync

    def _device(self) -> torch.device:
        """The sync device with its index (``cuda`` alone means the current GPU), as tensors report theirs."""
        if self.device.type == "cuda" and self.device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return self.device

    def _open_channels(self) -> list[Channel]:
        channels: list[Channel] = []
        try:
            for url in self.engine_urls:
                channels.append(Channel(url, self.api_key, self.timeout_s))
        except SyncError:
            for c in channels:
                c.close()
            raise
        return channels

    def _answers(self, channels: list[Channel], keep: int = 0) -> None:
        """Read answers until at most ``keep`` requests per engine are unanswered; raises naming each engine that
        failed (after reading the others' answers, so no connection is left mid-answer)."""
        errors = []
        for c in channels:
            while len(c.pending) > keep:
                try:
                    path, status, raw = c.receive()
                    self._decode(c.url, path, status, raw)
                except SyncError as e:
                    errors.append(str(e))
                    break
        if errors:
            raise SyncError("; ".join(errors))

    def sync(self, named: Iterable[tuple[str, torch.Tensor]], weight_version: int | str | None = None) -> SyncStats:
        """Send every tensor of ``named`` to every engine; returns what moved and how long it took.

        On each engine's pipelined connection the requests go ``/pause_generation``, one
        ``/update_weights_from_distributed`` per bucket, ``/continue_generation``. The engine handles them
        in that order, so the first broadcast starts without waiting for the pause's answer, and the sync
        costs no HTTP round trip of its own for the pause and the continue: their answers are read with
        the buckets'. When anything fails, every engine that may still be paused is continued on a fresh
        connection before the error is raised.
        """
        if self.group is None:
            self.connect()
        version = "" if weight_version is None else str(weight_version)
        device = self._device()
        start = time.perf_counter()
        total = count = nbuckets = 0
        channels: list[Channel] = []
        continued = False
        try:
            channels = self._open_channels()
            for c in channels:
                c.send(proto.PAUSE_GENERATION.path, proto.pause_generation_body(mode=self.pause_mode))
            staging = self._staging if self._staging is not None and self._staging.device == device else Staging(device)
            self._staging = staging if self.keep_buffers else None
            stream = buckets(named, self.bucket_bytes)
            current = next(stream, None)
            flat = staging.flatten(current) if current is not None else None  # while the engines pause
            following = next(stream, None)
            while current is not None and flat is not None:
                meta = current.metadata()
                last = following is None
                body = proto.update_weights_from_distributed_body(
                    names=meta["names"],
                    dtypes=meta["dtypes"],
                    shapes=meta["shapes"],
                    group_name=self.group_name,
                    flattened_bucket=True,
                    flush_cache=last,
                    weight_version=version if last and version else None,
                )
                if any(time.monotonic() - c.last_send > IDLE_SAFE_S for c in channels):
                    # Producing this bucket took long: the servers may be closing the idle connections.
                    # Drain them and start new ones (the server can only have been idle since our last request).
                    self._answers(channels)
                    for c in channels:
                        c.close()
                    channels = []
                    channels = self._open_channels()
                for c in channels:
                    c.send(proto.UPDATE_WEIGHTS_FROM_DISTRIBUTED.path, body)
                work = dist.broadcast(flat, src=0, group=self.group, async_op=True)
                total += current.size
                count += len(current.names)
                nbuckets += 1
                # While bucket k is on the wire: gather bucket k+2 and flatten bucket k+1 into the other buffer.
                current, following = following, None
                next_flat = staging.flatten(current) if current is not None else None
                if current is not None:
                    following = next(stream, None)
                assert work is not None
                work.wait()  # gloo: the bytes are sent; NCCL: later work on this stream waits for them
                # The answers before bucket k's (the pause's, bucket k-1's): bounds each engine's backlog to two.
                self._answers(channels, keep=1)
                flat = next_flat
            if nbuckets == 0:  # otherwise the last bucket's request flushed (``flush_cache``), as SGLang does it
                for c in channels:
                    c.send(proto.FLUSH_CACHE.path, None)
            for c in channels:
                c.send(proto.CONTINUE_GENERATION.path, proto.continue_generation_body())
            self._answers(channels)
            continued = True
        finally:
            for c in channels:
                c.close()
            if not continued:  # continuing is idempotent: also engines that did continue are asked again
                self._wait(self._post_all(proto.CONTINUE_GENERATION.path, proto.continue_generation_body()))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return SyncStats(time.perf_counter() - start, total, nbuckets, count, version)

    def raw_broadcast(self, nbytes: int, iters: int = 3) -> float:
        """Seconds per raw ``dist.broadcast`` of ``nbytes`` from this rank to the same engines, best of ``iters``.

        The reference of ``miles bench sync``: the engines run the same broadcast
        through the miles-only endpoint ``/miles/broadcast_bench`` (embedded engine only).
        """
        return min(self.raw_broadcasts(nbytes, iters))

    def raw_broadcasts(self, nbytes: int, iters: int = 3) -> list[float]:
        """Seconds of each of ``iters`` raw broadcasts of ``nbytes`` (see :meth:`raw_broadcast`)."""
        if self.group is None:
            self.connect()
        device = self._device()
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        futures = self._post_all(
            "/miles/broadcast_bench", {"group_name": self.group_name, "nbytes": nbytes, "iters": iters}
        )
        times = []
        try:
            for _ in range(iters):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                dist.broadcast(buf, src=0, group=self.group)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
        finally:
            del buf
        self._wait(futures)
        return times


def bench(sync: WeightSync, named: list[tuple[str, torch.Tensor]], iters: int = 3, warmup: int = 1) -> dict[str, float]:
    """Sync ``named`` ``iters`` times and compare with a raw broadcast of the same bytes (``miles bench sync``).

    ``warmup`` untimed syncs and one small raw broadcast come first, so that one-time costs (NCCL
    creating its communicator on the first collective, first-touch page faults on both sides)
    are counted in neither figure. Each timed sync is followed by two raw broadcasts of the same
    total as one tensor (the first one touches the fresh buffers, the better one counts), so both
    figures see the same moments of a shared machine. Returns seconds (best sync) and
    median_seconds, bytes, raw_seconds (best raw broadcast) and raw_median_seconds, GB/s of both and
    their ratio (sync speed / raw speed; 1.0 is the link's limit), and median_ratio (of the medians).
    """
    sync.raw_broadcasts(1 << 20, iters=1)
    for i in range(warmup):
        sync.sync(named, weight_version=f"bench-warmup-{i}")
    stats, raws = [], []
    for i in range(iters):
        stats.append(sync.sync(named, weight_version=f"bench-{i}"))
        raws.append(min(sync.raw_broadcasts(stats[-1].bytes, iters=2)))
    best = min(stats, key=lambda s: s.seconds)
    raw = min(raws)
    median, raw_median = statistics.median(s.seconds for s in stats), statistics.median(raws)
    return {
        "seconds": best.seconds,
        "median_seconds": median,
        "bytes": float(best.bytes),
        "buckets": float(best.buckets),
        "gb_per_s": best.gb_per_s,
        "raw_seconds": raw,
        "raw_median_seconds": raw_median,
        "raw_gb_per_s": best.bytes / raw / 1e9 if raw > 0 else 0.0,
        "ratio": raw / best.seconds if best.seconds > 0 else 0.0,
        "median_ratio": raw_median / median if median > 0 else 0.0,
    }
