"""Flattened weight buckets in SGLang's ``load_format = "flattened_bucket"`` layout.

A bucket is many named tensors sent as one broadcast: each tensor is flattened,
viewed as bytes and concatenated in the order of its ``names`` list, so mixed
dtypes share one ``uint8`` buffer. The receiver rebuilds the tensors from the
``names``, ``dtypes`` and ``shapes`` of the HTTP request alone (SGLang 0.5.20,
``sglang/srt/weight_sync/tensor_bucket.py``). One broadcast per bucket instead of
one per tensor is what makes the sync run near the link's raw broadcast speed.
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
    return count * torch.empty((), dtype=dtype).element_size()


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

    def flatten(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The bucket as one ``uint8`` tensor (on ``device`` when given)."""
        parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in self.tensors]
        flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        return flat if device is None else flat.to(device)


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
