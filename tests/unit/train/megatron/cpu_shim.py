"""Test-only: let megatron-core run on a CPU-only torch over gloo.

megatron-core asks CUDA for the current device, its RNG state and streams,
and creates a few scalars with ``device="cuda"`` (the pipeline schedules'
token counter). On a CPU build each of those raises; this points them at the
CPU. Import it before megatron builds anything. Never imported by ``miles``:
production runs on GPUs and needs none of it.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch

_cpu = torch.device("cpu")
torch.cuda.miles_cpu_shim = True  # type: ignore[attr-defined]  # lets MegatronActor accept a CPU device
torch.cuda.current_device = lambda: _cpu  # type: ignore[assignment,return-value]
torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore[assignment]
torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)  # type: ignore[assignment]
torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)  # type: ignore[assignment,return-value]
torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]  # tied embeddings under PP call .cuda()


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


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by one megatron module: ``device="cuda"`` in tensor factories means the CPU.

    Installed per module (not on ``torch`` itself: transformers wraps the
    global factories while loading checkpoints and a global patch breaks it).
    """

    _FACTORIES = frozenset({"zeros", "ones", "empty", "tensor", "full"})

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name not in self._FACTORIES:
            return attr

        def factory(*args: Any, **kwargs: Any) -> Any:
            dev = kwargs.get("device")
            if dev is not None and str(dev).startswith("cuda"):
                kwargs["device"] = _cpu
            kwargs.pop("pin_memory", None)  # no pinned-memory allocator without CUDA
            return attr(*args, **kwargs)

        return factory


import importlib  # noqa: E402

for _module in (
    "megatron.core.pipeline_parallel.schedules",  # the token counter
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.transformer.utils",  # the default causal mask
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.utils",
    "megatron.core.models.common.embeddings.rope_utils",  # context parallelism's chunk index (pinned, then .cuda())
):
    importlib.import_module(_module).torch = _CpuTorch("torch")  # type: ignore[attr-defined]

import megatron.core.tensor_parallel.random as _random  # noqa: E402

_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

import megatron.core.transformer.moe.token_dispatcher as _dispatcher  # noqa: E402


def _splits_to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """The all-to-all dispatcher copies its split sizes device->host as numpy; on the CPU nothing is copied,
    so the conversion to numpy (which ``all_to_all_single`` needs as a sequence) is done here."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


_dispatcher.maybe_move_tensor_to_cpu = _splits_to_host
