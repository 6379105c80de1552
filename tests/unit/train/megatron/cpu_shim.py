"""Test-only: let megatron-core run on a CPU-only torch over gloo.

megatron-core asks CUDA for the current device, its RNG state and streams,
and creates a few scalars with ``device="cuda"`` (the pipeline schedules'
token counter). On a CPU build each of those raises; this points them at the
CPU. Import it before megatron builds anything. Never imported by ``miles``:
production runs on GPUs and needs none of it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

_cpu = torch.device("cpu")
torch.cuda.current_device = lambda: _cpu  # type: ignore[assignment,return-value]
torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore[assignment]
torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)  # type: ignore[assignment]
torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)  # type: ignore[assignment,return-value]
torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]


class _NullEvent:
    def synchronize(self) -> None: ...
    def wait(self, *a: Any, **k: Any) -> None: ...


class _NullStream:
    """Stands for every CUDA stream: work on the CPU is already ordered."""

    def __init__(self, *a: Any, **k: Any) -> None: ...
    def wait_event(self, *a: Any, **k: Any) -> None: ...
    def wait_stream(self, *a: Any, **k: Any) -> None: ...
    def synchronize(self) -> None: ...
    def record_event(self, *a: Any, **k: Any) -> _NullEvent:
        return _NullEvent()


_stream = _NullStream()
torch.cuda.current_stream = lambda *a, **k: _stream  # type: ignore[assignment,return-value]
torch.cuda.Stream = _NullStream  # type: ignore[assignment,misc]  # a class: transformers writes `Stream | None`
torch.cuda.stream = lambda s=None: contextlib.nullcontext()  # type: ignore[assignment]


def _on_cpu(factory: Any) -> Any:
    @functools.wraps(factory)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        dev = kwargs.get("device")
        if dev is not None and str(dev).startswith("cuda"):
            kwargs["device"] = _cpu
        return factory(*args, **kwargs)

    return wrapped


for _name in ("zeros", "ones", "empty", "tensor", "full"):
    setattr(torch, _name, _on_cpu(getattr(torch, _name)))

import megatron.core.tensor_parallel.random as _random  # noqa: E402

_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
