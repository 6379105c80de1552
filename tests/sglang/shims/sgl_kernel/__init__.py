"""Test-only stand-in for ``sgl_kernel`` so SGLang's CPU engine starts on a CPU without AMX kernels.

Why it exists: SGLang's CPU engine imports ``sgl_kernel`` CPU ops, and PyPI has
no CPU build of that package (only multi-hundred-MiB CUDA wheels, no sdist).
With ``--attention-backend torch_native`` the server needs exactly one of its
ops while serving: ``assign_req_to_token_pool_cpu`` (writing a request's KV
slots into the request-to-token table), done here in plain torch. Any other op
is importable (SGLang imports many at module level) but raises when called, so
a code path that would need a real kernel fails loudly instead of computing
something wrong. This directory goes on PYTHONPATH only for the integration
tests (``tests/sglang``); production engines use the real package.
"""

from __future__ import annotations

from typing import Any, NoReturn

import torch

__version__ = "0.0.0+miles-test-shim"


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """For each request i: ``req_to_token[pool[i], start[i]:end[i]] = out_cache_loc[off:off+n]``, packed in order."""
    del pool_len  # the row length; slicing the row already bounds the write
    offset = 0
    for i in range(req_pool_indices.shape[0]):
        start, end = int(start_offset[i]), int(end_offset[i])
        n = end - start
        req_to_token[int(req_pool_indices[i]), start:end] = out_cache_loc[offset : offset + n].to(req_to_token.dtype)
        offset += n


def _missing(name: str) -> Any:
    def op(*args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(f"sgl_kernel.{name} has no CPU implementation in miles' test shim")

    op.__name__ = name
    return op


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)
