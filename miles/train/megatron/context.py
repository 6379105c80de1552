"""Context parallelism (``[perf] cp``) without Transformer Engine: the sequence layout and its collectives.

Under context parallelism every rank of a CP group holds a slice of each
sequence's tokens and runs the whole model on it. Causal attention makes the
last tokens the most expensive (a token attends to everything before it), so
the sequence is cut into ``2 * cp`` equal chunks and rank ``r`` holds chunks
``r`` and ``2 * cp - 1 - r``: each rank gets one cheap and one expensive chunk.
This is the layout Megatron's rotary embedding already assumes
(``get_pos_emb_on_this_cp_rank``), so RoPE positions come out right without
any help from miles.

Two collectives, with different backward rules:

* attention gathers every rank's keys and values (:func:`gather_keys_values`);
  each rank's queries attend to all of them, so the gradient of a rank's keys
  is the *sum* over ranks (reduce-scatter backward);
* the loss gathers every rank's per-token log-probs and entropies
  (:func:`gather_token_stats`) so every rank computes the identical GRPO loss
  over whole sequences (per-sample means need whole sequences); each rank then
  back-propagates only its own tokens' share (slice backward), and the data-
  and context-parallel gradient sum in Megatron's DDP adds the shares up.

Only ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` are used, which
NCCL and gloo (torch >= 2.13 on CPUs) both provide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ContextLayout:
    """Where this rank's tokens sit in the full sequence: chunks ``rank`` and ``2 * size - 1 - rank``."""

    size: int
    rank: int
    group: Any = None

    @classmethod
    def current(cls) -> ContextLayout:
        """The layout of Megatron's context-parallel group (size 1 when CP is off)."""
        from megatron.core import parallel_state as ps

        size = ps.get_context_parallel_world_size()
        if size == 1:
            return cls(1, 0, None)
        return cls(size, ps.get_context_parallel_rank(), ps.get_context_parallel_group())

    @property
    def chunks(self) -> tuple[int, int]:
        """Global chunk indices of this rank's first and second half."""
        return self.rank, 2 * self.size - 1 - self.rank

    def padded_length(self, length: int, multiple: int = 1) -> int:
        """The smallest length >= ``length`` that splits into ``2 * size`` chunks, each a multiple of ``multiple``."""
        step = (2 * self.size if self.size > 1 else 1) * multiple
        return -(-length // step) * step

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's two chunks of ``x`` along ``dim`` (whose length divides by ``2 * size``), concatenated."""
        if self.size == 1:
            return x
        n = x.shape[dim]
        if n % (2 * self.size):
            raise ValueError(f"sequence length {n} does not split into {2 * self.size} context-parallel chunks")
        parts = x.chunk(2 * self.size, dim=dim)
        a, b = self.chunks
        return torch.cat([parts[a], parts[b]], dim=dim)

    def _full_order(self, gathered: torch.Tensor, dim: int) -> torch.Tensor:
        """``[size * local]`` rank-major along ``dim`` -> the original sequence order."""
        c = gathered.shape[dim] // (2 * self.size)
        pieces = gathered.split(c, dim=dim)  # rank r's halves are pieces 2r and 2r+1
        order = [0] * (2 * self.size)
        for r in range(self.size):
            order[r], order[2 * self.size - 1 - r] = 2 * r, 2 * r + 1
        return torch.cat([pieces[i] for i in order], dim=dim)

    def gather_token_stats(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's slice of ``x`` along ``dim`` in sequence order; backward keeps this rank's slice only."""
        if self.size == 1:
            return x
        return self._full_order(_gather(x, dim, self.group, self.size, reduce_grad=False), dim)

    def gather_keys_values(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's slice of ``x`` along ``dim`` in sequence order; backward sums the gradient over ranks."""
        if self.size == 1:
            return x
        return self._full_order(_gather(x, dim, self.group, self.size, reduce_grad=True), dim)


def _gather(x: torch.Tensor, dim: int, group: Any, size: int, reduce_grad: bool) -> torch.Tensor:
    moved = x.movedim(dim, 0).contiguous()
    out = _AllGather.apply(moved, group, size, reduce_grad)
    return out.movedim(0, dim)


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0; backward either reduce-scatters (sum) or takes this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, size: int, reduce_grad: bool) -> torch.Tensor:
        ctx.group, ctx.size, ctx.reduce_grad = group, size, reduce_grad
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        grad = grad.contiguous()
        n = grad.shape[0] // ctx.size
        if not ctx.reduce_grad:
            rank = dist.get_rank(ctx.group)
            return grad[rank * n : (rank + 1) * n].clone(), None, None, None
        out = grad.new_empty((n, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None, None, None
