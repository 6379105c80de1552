"""Colocated weight sync: tensors handed to the engine on the same GPU through ``/update_weights_from_tensor``.

When a trainer rank and an engine share a GPU (``[cluster] mode = "colocate"``),
nothing has to travel: the trainer builds each bucket once on its own device
and gives the engine a *handle* to it (CUDA IPC for CUDA tensors, a POSIX
shared-memory file for CPU tensors). The engine maps the memory and copies the
weights in place.

The wire form is SGLang 0.5.20's own, so the same sender drives an SGLang
server and the embedded engine:

* the body is ``UpdateWeightsFromTensorReqInput``: ``serialized_named_tensors``
  holds one base64 string per TP rank of the engine (each rank opens only its
  own entry, which must be a handle to memory on *its* GPU), ``load_format =
  "flattened_bucket"``, ``flush_cache`` on the last bucket, ``weight_version``;
* each entry is what SGLang's ``MultiprocessingSerializer.serialize(...,
  output_str=True)`` makes of ``{"flattened_tensor": flat, "metadata": [...]}``:
  torch's ``ForkingPickler`` stream, base64-encoded. ``flat`` is the bucket's
  tensors' bytes concatenated (:mod:`miles.transfer.bucket`) and each metadata
  item pickles as SGLang's ``sglang.srt.weight_sync.tensor_bucket.FlattenedTensorMetadata``
  (name, shape, dtype, start_idx, end_idx, numel). SGLang is not installed
  beside the trainer, so :class:`FlattenedTensorMetadata` here mirrors that
  class and the pickler writes SGLang's module path for it;
* CUDA tensors name their device by GPU UUID instead of index, as SGLang's
  ``monkey_patch_torch_reductions`` does on both sides: an engine started with
  ``CUDA_VISIBLE_DEVICES=<its GPUs>`` numbers the GPUs differently from the trainer;
* CPU tensors travel through torch's ``file_system`` sharing strategy (a named
  shared-memory file and torch's ``torch_shm_manager`` socket). The default
  ``file_descriptor`` strategy passes fds through ``multiprocessing``'s resource
  sharer, which authenticates with a per-process-tree key that an unrelated
  server process does not have.

The sender keeps every bucket alive until every engine answered: the engine
maps the sender's memory, it does not own a copy.

With several trainer ranks (FSDP or Megatron, colocated), every rank shares a
copy of the bucket on its own GPU and the engine TP rank on that GPU maps it:
the full tensors exist on trainer rank 0 (see
:meth:`miles.train.actor.Actor.named_hf_weights`: FSDP ``full_tensor``, Megatron's
TP/EP all-gather and PP send), rank 0 broadcasts each flattened bucket over the
trainers' own process group (NVLink/NCCL inside a node), every rank serializes
its copy, and rank 0 gathers the strings and posts engine ``e`` the entries of
the trainer ranks ``e * tp .. e * tp + tp - 1`` (the planner puts engine ``e``'s
TP rank ``j`` on the GPU of trainer rank ``e * tp + j``). Rank 0 then tells the
other ranks the outcome, so all of them free the bucket, or stop, together.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import pickle
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp
from torch.multiprocessing import reductions

from miles.sglang import protocol as proto
from miles.transfer.bucket import Bucket, buckets
from miles.transfer.sync import SyncError, SyncStats

SGLANG_METADATA = ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata")
"""Where SGLang 0.5.20 defines the per-tensor metadata of a flattened bucket (module, class)."""


@dataclass
class FlattenedTensorMetadata:
    """One tensor of a flattened bucket: SGLang's class of the same name, field for field."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    """First byte of the tensor in the flat ``uint8`` buffer."""
    end_idx: int
    numel: int
    """Bytes of the tensor (SGLang counts the flattened ``uint8`` view's elements)."""


def bucket_metadata(bucket: Bucket) -> list[FlattenedTensorMetadata]:
    """The metadata of ``bucket`` in the order its bytes are concatenated (:meth:`Bucket.flatten`)."""
    out, offset = [], 0
    for name, t in zip(bucket.names, bucket.tensors, strict=True):
        size = t.numel() * t.element_size()
        out.append(FlattenedTensorMetadata(name, t.shape, t.dtype, offset, offset + size, size))
        offset += size
    return out


# ---------------------------------------------------------------------- the sender's pickler

_share_lock = threading.Lock()


def _gpu_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _reduce_tensor_by_uuid(tensor: torch.Tensor) -> tuple[Any, tuple[Any, ...]]:
    """torch's reduction, with a CUDA tensor's device index replaced by the GPU's UUID (SGLang's patch)."""
    rebuild, args = reductions.reduce_tensor(tensor)
    if tensor.is_cuda:
        args = (*args[:6], _gpu_uuid(int(args[6])), *args[7:])
    return rebuild, args


_PurePickler: Any = pickle._Pickler  # type: ignore[attr-defined]  # untyped in typeshed


class _SGLangPickler(_PurePickler):
    """``ForkingPickler``'s reductions, writing :class:`FlattenedTensorMetadata` as SGLang's class.

    The pure-Python pickler, because the C one refuses to name a class whose
    module it cannot import (SGLang is not installed beside the trainer). The
    payload is a dict, a list of small records and one tensor: its speed does
    not matter.
    """

    def __init__(self, file: io.BytesIO) -> None:
        from multiprocessing.reduction import ForkingPickler

        super().__init__(file)
        table = dict(ForkingPickler._copyreg_dispatch_table)  # type: ignore[attr-defined]
        table.update(ForkingPickler._extra_reducers)  # type: ignore[attr-defined]
        table[torch.Tensor] = _reduce_tensor_by_uuid
        table[torch.nn.Parameter] = _reduce_tensor_by_uuid
        self.dispatch_table = table

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is FlattenedTensorMetadata:
            module, qualname = SGLANG_METADATA
            self.save(module)
            self.save(qualname)
            self.write(pickle.STACK_GLOBAL)
            self.memoize(obj)
            return
        super().save_global(obj, name)


def serialize_bucket(flat: torch.Tensor, metadata: Sequence[FlattenedTensorMetadata]) -> str:
    """One ``serialized_named_tensors`` entry: SGLang's ``MultiprocessingSerializer`` form, base64 (``output_str``).

    A CPU ``flat`` is moved to shared memory (torch's ``file_system`` strategy, see
    the module docstring); a CUDA one is shared by its CUDA-IPC handle. Either way the
    caller must keep ``flat`` alive until the engine has answered.
    """
    if flat.dtype != torch.uint8 or flat.dim() != 1:
        raise ValueError(f"a flattened bucket is a 1-D uint8 tensor, got {flat.dtype} of shape {tuple(flat.shape)}")
    buf = io.BytesIO()
    obj = {"flattened_tensor": flat, "metadata": list(metadata)}
    with _share_lock:
        before = torch_mp.get_sharing_strategy()
        torch_mp.set_sharing_strategy("file_system")
        try:
            _SGLangPickler(buf).dump(obj)
        finally:
            torch_mp.set_sharing_strategy(before)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------- the receiver's unpickler


def _rebuild_cuda_tensor(*args: Any) -> torch.Tensor:
    """torch's ``rebuild_cuda_tensor``, accepting the device as a GPU UUID (SGLang's patched form)."""
    device = args[6]
    if isinstance(device, str):
        found = [i for i in range(torch.cuda.device_count()) if _gpu_uuid(i) == device]
        if not found:
            raise ValueError(
                f"the tensor lives on GPU {device}, which this engine process does not see "
                "(colocated sync needs the trainer and the engine on the same GPU)"
            )
        device = found[0]
    rebuild: Any = reductions.rebuild_cuda_tensor
    return rebuild(*args[:6], device, *args[7:])


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("torch.multiprocessing.reductions", "rebuild_tensor"): reductions.rebuild_tensor,
        ("torch.multiprocessing.reductions", "rebuild_typed_storage"): reductions.rebuild_typed_storage,
        ("torch.multiprocessing.reductions", "rebuild_storage_filename"): reductions.rebuild_storage_filename,
        ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"): _rebuild_cuda_tensor,
        ("sglang.srt.utils.patch_torch", "_rebuild_cuda_tensor_modified"): _rebuild_cuda_tensor,
        ("torch", "Tensor"): torch.Tensor,
        ("torch", "Size"): torch.Size,
        ("torch.storage", "UntypedStorage"): torch.storage.UntypedStorage,
        ("torch.storage", "TypedStorage"): torch.storage.TypedStorage,
        ("torch", "UntypedStorage"): torch.UntypedStorage,
        SGLANG_METADATA: FlattenedTensorMetadata,
    }
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class _BucketUnpickler(pickle.Unpickler):
    """Loads only what a flattened bucket is made of: torch's tensor/storage rebuilders, dtypes and the metadata.

    SGLang 0.5.20's ``SafeUnpickler`` allows whole module prefixes (``builtins.``,
    ``torch.``, ``sglang.srt.``...) minus a deny list; this allows exact names only,
    the ones :func:`serialize_bucket` and SGLang's own senders write. Anything else
    (``os.system``, a foreign class) is refused before it is called.
    """

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a serialized flattened bucket may only contain torch tensors, "
                f"dtypes and {'.'.join(SGLANG_METADATA)}"
            )
        return found


def deserialize_bucket(entry: str | bytes) -> tuple[torch.Tensor, list[FlattenedTensorMetadata]]:
    """The flat tensor and metadata of one ``serialized_named_tensors`` entry, checked for consistency.

    Raises ``ValueError`` (or ``pickle.UnpicklingError``) with the reason when the entry is
    not a flattened bucket, or its metadata does not describe its buffer.
    """
    raw = base64.b64decode(entry, validate=True) if isinstance(entry, str) else bytes(entry)
    obj = _BucketUnpickler(io.BytesIO(raw)).load()
    if not isinstance(obj, dict) or set(obj) != {"flattened_tensor", "metadata"}:
        raise ValueError("a flattened_bucket entry must be a dict with keys flattened_tensor and metadata")
    flat, metadata = obj["flattened_tensor"], obj["metadata"]
    if not isinstance(flat, torch.Tensor) or flat.dtype != torch.uint8 or flat.dim() != 1:
        raise ValueError("flattened_tensor must be a 1-D uint8 tensor")
    if not isinstance(metadata, list) or not all(isinstance(m, FlattenedTensorMetadata) for m in metadata):
        raise ValueError("metadata must be a list of FlattenedTensorMetadata")
    for m in metadata:
        count = 1
        for s in m.shape:
            count *= int(s)
        size = count * torch.empty((), dtype=m.dtype).element_size()
        if m.numel != size or m.end_idx - m.start_idx != size or m.start_idx < 0 or m.end_idx > flat.numel():
            raise ValueError(
                f"metadata of {m.name!r} ({m.start_idx}:{m.end_idx}, {m.numel} bytes for "
                f"{tuple(m.shape)} {m.dtype}) does not fit the {flat.numel()}-byte buffer"
            )
    return flat, metadata


def reconstruct(flat: torch.Tensor, metadata: Sequence[FlattenedTensorMetadata]) -> list[tuple[str, torch.Tensor]]:
    """Views of ``flat`` as the bucket's named tensors (SGLang's ``FlattenedTensorBucket.reconstruct_tensors``)."""
    out = []
    for m in metadata:
        piece = flat[m.start_idx : m.end_idx]
        try:
            tensor = piece.view(m.dtype)
        except RuntimeError:  # misaligned for its dtype inside a mixed-dtype bucket
            tensor = piece.clone().view(m.dtype)
        out.append((m.name, tensor.reshape(m.shape)))
    return out


# ---------------------------------------------------------------------- the sync


def _lookahead(it: Iterator[Bucket]) -> Iterator[tuple[Bucket, bool]]:
    prev: Bucket | None = None
    for b in it:
        if prev is not None:
            yield prev, False
        prev = b
    if prev is not None:
        yield prev, True


class _Share:
    """One bucket's flat copy on this rank's device and its serialized handle; lives until the engines answered.

    With several trainer ranks every rank runs the same collectives whatever
    fails locally (a failure is carried to rank 0 in place of the entry, and
    :func:`_agree` tells every rank), so no rank is left waiting in a collective.
    """

    def __init__(self, bucket: Bucket, device: torch.device, group: Any, source: bool, copies: int = 1) -> None:
        world = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        self.error = ""
        try:
            self.flat = bucket.flatten(device) if source else torch.empty(bucket.size, dtype=torch.uint8, device=device)
        except Exception as e:
            if world == 1:
                raise
            self.error = f"trainer rank {rank}: {e}"
            self.flat = torch.empty(bucket.size, dtype=torch.uint8, device=device)  # stays in step
        if world > 1:
            dist.broadcast(self.flat, src=dist.get_global_rank(group, 0), group=group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the engine reads the memory from another process
        meta = bucket_metadata(bucket)
        if world == 1:
            # One serialization per receiving TP rank: each rank's load releases the reference its own entry took.
            self.entries = [serialize_bucket(self.flat, meta) for _ in range(copies)]
            return
        mine: dict[str, str] = {"error": self.error}
        if not self.error:
            try:
                mine = {"entry": serialize_bucket(self.flat, meta)}
            except Exception as e:
                mine = {"error": f"trainer rank {rank}: {e}"}
        gathered: list[Any] | None = [None] * world if source else None
        dist.gather_object(mine, gathered, dst=dist.get_global_rank(group, 0), group=group)
        self.entries = []
        if source:
            assert gathered is not None
            errors = [g["error"] for g in gathered if "error" in g]
            if errors:
                raise SyncError("; ".join(errors))
            self.entries = [str(g["entry"]) for g in gathered]


def _agree(status: str, group: Any, source: bool) -> str:
    """Rank 0's outcome of a bucket, told to every trainer rank ('' when the engines took it)."""
    if group is None or dist.get_world_size(group) == 1:
        return status
    box = [status if source else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return str(box[0])


class TensorSync:
    """The colocated sender on trainer rank 0, with the interface of :class:`~miles.transfer.sync.WeightSync`.

    ``engine_indices[k]`` is the plan's index of ``engine_urls[k]`` (a fleet that
    dropped a dead engine keeps the others' indices); with ``group`` (the
    trainers' process group, more than one rank) every other rank runs
    :class:`TensorSyncPeer` in step. No weight-update group is formed, so
    :meth:`connect` has nothing to do.
    """

    def __init__(
        self,
        engine_urls: Sequence[str],
        bucket_bytes: int = 512 * 1024 * 1024,
        api_key: str | None = None,
        device: str | torch.device = "cpu",
        timeout_s: float = 600.0,
        pause_mode: proto.PauseMode = "abort",
        ranks_per_engine: int = 1,
        engine_indices: Sequence[int] | None = None,
        group: Any = None,
    ) -> None:
        if not engine_urls:
            raise ValueError("weight sync needs at least one engine URL")
        self.engine_urls = [u.rstrip("/") for u in engine_urls]
        self.bucket_bytes = bucket_bytes
        self.api_key = api_key
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.pause_mode = pause_mode
        self.ranks_per_engine = ranks_per_engine
        self.engine_indices = list(range(len(self.engine_urls))) if engine_indices is None else list(engine_indices)
        if len(self.engine_indices) != len(self.engine_urls):
            raise ValueError("engine_indices must name the plan index of every engine URL")
        self.trainer_group = group
        world = dist.get_world_size(group) if group is not None else 1
        needed = (max(self.engine_indices) + 1) * ranks_per_engine
        if world > 1 and needed > world:
            raise ValueError(
                f"{needed} engine GPUs but {world} trainer ranks: colocated engines share the trainers' GPUs"
            )
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max(2, len(self.engine_urls)), thread_name_prefix="miles-colocate"
        )

    def _post(self, url: str, path: str, body: dict[str, Any] | None) -> Any:
        req = urllib.request.Request(
            url + path,
            data=json.dumps(body or {}).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise SyncError(f"{url}{path} answered {e.code}: {e.read().decode(errors='replace')[:500]}") from e
        except (urllib.error.URLError, OSError) as e:
            raise SyncError(f"{url}{path} failed: {e}") from e
        try:
            result = json.loads(raw) if raw else None
        except ValueError:
            return raw.decode(errors="replace")
        if isinstance(result, dict) and result.get("success") is False:
            raise SyncError(f"{url}{path}: {result.get('message')}")
        return result

    def _post_all(self, path: str, bodies: Sequence[dict[str, Any]]) -> None:
        """POST to every engine at once (``bodies[k]`` to engine ``k``); raise one error naming every failure."""
        futures = [
            self._pool.submit(self._post, url, path, body) for url, body in zip(self.engine_urls, bodies, strict=True)
        ]
        errors = []
        for f in futures:
            try:
                f.result()
            except SyncError as e:
                errors.append(str(e))
        if errors:
            raise SyncError("; ".join(errors))

    def connect(self) -> None:
        """Nothing to form: the engines map this process' memory directly."""

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def _entries_for(self, share: _Share, k: int) -> list[str]:
        tp = self.ranks_per_engine
        if self.trainer_group is None or dist.get_world_size(self.trainer_group) == 1:
            return share.entries[k * tp : (k + 1) * tp]  # one trainer process shares its copy with every engine rank
        first = self.engine_indices[k] * tp
        return share.entries[first : first + tp]

    def sync(self, named: Iterable[tuple[str, torch.Tensor]], weight_version: int | str | None = None) -> SyncStats:
        """Hand every tensor of ``named`` to every engine, bucket by bucket; returns what moved and how long it took."""
        version = "" if weight_version is None else str(weight_version)
        start = time.perf_counter()
        total = count = nbuckets = 0
        every = len(self.engine_urls)
        try:
            # Inside the try: when one engine fails to pause, the others that did are continued below.
            self._post_all(proto.PAUSE_GENERATION.path, [proto.pause_generation_body(mode=self.pause_mode)] * every)
            for bucket, last in _lookahead(buckets(named, self.bucket_bytes)):
                status = ""
                share: _Share | None = None
                try:
                    share = _Share(
                        bucket, self.device, self.trainer_group, source=True, copies=every * self.ranks_per_engine
                    )
                    self._post_all(
                        proto.UPDATE_WEIGHTS_FROM_TENSOR.path,
                        [
                            proto.update_weights_from_tensor_body(
                                serialized_named_tensors=self._entries_for(share, k),
                                load_format=proto.FLATTENED_BUCKET,
                                flush_cache=last,
                                weight_version=version if last and version else None,
                            )
                            for k in range(every)
                        ],
                    )
                except Exception as e:  # every rank must hear of it, or the others wait forever
                    status = str(e) or type(e).__name__
                status = _agree(status, self.trainer_group, source=True)
                del share  # the engines copied the bucket: its memory may go
                if status:
                    raise SyncError(status)
                total += bucket.size
                count += len(bucket.names)
                nbuckets += 1
        finally:
            self._post_all(proto.CONTINUE_GENERATION.path, [proto.continue_generation_body()] * every)
        return SyncStats(time.perf_counter() - start, total, nbuckets, count, version)


class TensorSyncPeer:
    """What the other trainer ranks run while rank 0 runs :meth:`TensorSync.sync`: share their copy of each bucket."""

    def __init__(self, bucket_bytes: int, device: str | torch.device, group: Any = None) -> None:
        self.bucket_bytes = bucket_bytes
        self.device = torch.device(device)
        self.group = group

    def sync(self, named: Iterable[tuple[str, torch.Tensor]], weight_version: int | str | None = None) -> None:
        it = iter(named)
        # The same look-ahead as rank 0: every rank must pull the same tensors (a collective) between two buckets.
        for bucket, _ in _lookahead(buckets(it, self.bucket_bytes)):
            share = _Share(bucket, self.device, self.group, source=False)
            status = _agree("", self.group, source=False)
            del share
            if status:
                for _ in it:  # rank 0 walks its iterator to the end (a collective) before it raises
                    pass
                raise SyncError(status)
