"""Flattened weight buckets in SGLang's ``load_format = "flattened_bucket"`` layout.

A bucket is many named tensors sent as one broadcast: each tensor is flattened,
viewed as bytes and concatenated in the order of its ``names`` list, so mixed
dtypes share one ``uint8`` buffer. The receiver rebuilds the tensors from the
``names``, ``dtypes`` and ``shapes`` of the HTTP request alone (SGLang 0.5.20,
``sglang/srt/weight_sync/tensor_bucket.py``). One broadcast per bucket instead of
one per tensor is what makes the sync run near the link's raw broadcast speed.

Flattening is a copy of every byte, so it is as costly as the broadcast itself
on a host (both are memory copies). Two ways keep it off the critical path:
:meth:`Bucket.flatten` writes into a buffer the caller reuses (``out=``) with one
``copy_`` per tensor (``torch.cat`` of ``uint8`` views runs ~3x slower on CPUs
than plain copies), and :meth:`Bucket.zero_copy` skips the copy altogether when
the tensors already lie back to back in one storage (a bucket of one contiguous
tensor always does).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype spelling SGLang's receiver resolves with ``getattr(torch, name)``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    count = 1
    for s in shape:
        count *= int(s)
    return count * dtype.itemsize


def _copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy ``src``'s elements into the ``uint8`` slice ``dst``, without an intermediate copy where possible."""
    if src.is_contiguous():
        dst.copy_(src.reshape(-1).view(torch.uint8))
        return
    try:  # a strided source is gathered straight into the buffer, viewed with its dtype
        dst.view(src.dtype).view(src.shape).copy_(src)
    except RuntimeError:  # the slice is misaligned for src's dtype (a mixed-dtype bucket)
        dst.copy_(src.contiguous().reshape(-1).view(torch.uint8))


@dataclass
class Bucket:
    """Named tensors that travel in one broadcast."""

    names: list[str] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    size: int = 0
    """Bytes of the flattened buffer."""

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.names.append(name)
        self.tensors.append(tensor)
        self.size += tensor.numel() * tensor.element_size()

    def metadata(self) -> dict[str, list]:
        """The ``names``/``dtypes``/``shapes`` of SGLang's UpdateWeightsFromDistributedReqInput."""
        return {
            "names": list(self.names),
            "dtypes": [dtype_name(t.dtype) for t in self.tensors],
            "shapes": [list(t.shape) for t in self.tensors],
        }

    def flatten(self, device: torch.device | str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The bucket as one ``uint8`` tensor (on ``device`` when given).

        Without ``out`` the result is a fresh buffer the caller owns. With ``out``
        (a ``uint8`` tensor of at least :attr:`size` elements, on the target device)
        the bytes are written into its first :attr:`size` elements and that view is
        returned, so one buffer serves every bucket of a sync.
        """
        with torch.no_grad():
            if out is None:
                target = (
                    torch.device(device)
                    if device is not None
                    else (self.tensors[0].device if self.tensors else torch.device("cpu"))
                )
                flat = torch.empty(self.size, dtype=torch.uint8, device=target)
            else:
                if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < self.size:
                    raise ValueError(
                        f"out must be a 1-d uint8 tensor of at least {self.size} elements, "
                        f"got {out.dtype} {tuple(out.shape)}"
                    )
                if device is not None and out.device != torch.device(device):
                    raise ValueError(f"out is on {out.device}, not on {device}")
                flat = out[: self.size]
            offset = 0
            batched: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
            for t in self.tensors:
                n = t.numel() * t.element_size()
                if t.is_contiguous() and t.device == flat.device:  # copied together below
                    batched[0].append(flat[offset : offset + n])
                    batched[1].append(t.detach().reshape(-1).view(torch.uint8))
                else:
                    _copy_bytes(flat[offset : offset + n], t.detach())
                offset += n
            if batched[0]:
                # one multi-tensor launch instead of one copy per tensor: a bucket holds hundreds of small
                # tensors (norms, biases), and their launches, not their bytes, were a sync's fixed cost on GPUs
                torch._foreach_copy_(batched[0], batched[1])
        return flat

    def zero_copy(self, device: torch.device | str | None = None) -> torch.Tensor | None:
        """A ``uint8`` view of the bucket's bytes where they already are, or ``None`` when a copy is needed.

        Holds when every tensor is contiguous, on ``device`` (when given) and
        directly follows the previous one in the same storage: a single contiguous
        tensor, or consecutive slices of one flat parameter buffer. Sending the view
        moves the very bytes :meth:`flatten` would have produced; the sender only
        reads them (a broadcast's source buffer is not written).
        """
        if not self.tensors:
            return None
        first = self.tensors[0]
        target = first.device if device is None else torch.device(device)
        storage = first.untyped_storage()
        base = storage.data_ptr()
        expected = first.data_ptr()
        for t in self.tensors:
            if (
                t.device != target
                or not t.is_contiguous()
                or t.data_ptr() != expected
                or (t.untyped_storage().data_ptr() != base)
            ):
                return None
            expected += t.numel() * t.element_size()
        with torch.no_grad():
            return torch.empty(0, dtype=torch.uint8, device=target).set_(
                storage, first.data_ptr() - base, (self.size,), (1,)
            )


def buckets(named: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[Bucket]:
    """Group tensors in order into buckets of at most ``max_bytes`` (a larger tensor travels alone)."""
    if max_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {max_bytes}")
    current = Bucket()
    for name, tensor in named:
        size = tensor.numel() * tensor.element_size()
        if current.names and current.size + size > max_bytes:
            yield current
            current = Bucket()
        current.add(name, tensor)
    if current.names:
        yield current


def unflatten(
    flat: torch.Tensor, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]]
) -> list[tuple[str, torch.Tensor]]:
    """Views of ``flat`` as the named tensors of a bucket, in order (the receiver's half)."""
    expected = bucket_bytes(dtypes, shapes)
    if expected != flat.numel():
        raise ValueError(f"bucket of {flat.numel()} bytes does not match its metadata ({expected} bytes)")
    out: list[tuple[str, torch.Tensor]] = []
    offset = 0
    for name, dname, shape in zip(names, dtypes, shapes, strict=True):
        dtype = dtype_from_name(dname)
        size = nbytes(shape, dtype)
        piece = flat[offset : offset + size]
        try:
            tensor = piece.view(dtype)
        except RuntimeError:  # a mixed-dtype bucket can leave a tensor misaligned for its dtype
            tensor = piece.clone().view(dtype)
        out.append((name, tensor.reshape(list(shape))))
        offset += size
    return out


def bucket_bytes(dtypes: Sequence[str], shapes: Sequence[Sequence[int]]) -> int:
    return sum(nbytes(s, dtype_from_name(d)) for d, s in zip(dtypes, shapes, strict=True))
