"""The static buffers the fast decode path runs a batch in: KV cache, RoPE tables, sampling state, recorded tokens.

A CUDA graph replays kernels on the addresses it was captured with, so everything one decode step of
:class:`~miles.engine.decoder.StaticDecoder` reads or writes lives in one :class:`Workspace` allocated up front
for a batch bucket (rows) and a length (KV slots): the per-layer K/V buffers, each row's token and position, the
step counter, the next logits, the per-row sampling tensors and draws, and the tokens and logprobs recorded for
the host to read back. A new batch is copied into these buffers in place; compacting finished rows moves the live
ones to the front of them. Shapes come from few buckets (powers of two, attention windows in steps of
``WINDOW_STEP``), so few graphs are captured. Which forward runs in the buffers is the decoder's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from miles.engine.sampling import BatchSampling

MIN_WINDOW = 128
"""Smallest workspace length; workspace lengths are powers of two from here."""

WINDOW_STEP = 64
"""Attention windows (KV slots read per decode step) are multiples of this up to ``FINE_WINDOWS``, then powers of
two: a step reads little more than the longest live row, from a few captured graphs."""

FINE_WINDOWS = 512

MEMORY_SHARE = 0.6
"""Share of the GPU's free memory a workspace (KV cache, logits, draws) may take; larger batches are split."""


def bucket(n: int, floor: int = 1) -> int:
    """The power of two >= max(n, floor): shapes come from few buckets, so few graphs are captured."""
    b = floor
    while b < n:
        b *= 2
    return b


@dataclass
class Workspace:
    """The static buffers one batch bucket decodes in (a graph reads and writes only these)."""

    rows: int
    length: int
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    cos: torch.Tensor
    sin: torch.Tensor
    """RoPE's sin with rotate_half's sign folded in: -sin on the first half of each head."""
    tok: torch.Tensor
    pos: torch.Tensor
    step: torch.Tensor
    logits: torch.Tensor
    """[rows, vocab]: the next token's logits. float32 and already divided by each row's temperature; fused
    (``raw``): as the model's lm_head gave them (its dtype, undivided), the sampler converts and divides them on
    the fly, so no float32 copy of the logits is written each step."""
    tokens: torch.Tensor
    logprobs: torch.Tensor
    slots: torch.Tensor
    row_ids: torch.Tensor
    sampling: BatchSampling | None = None
    raw: bool = False
    graphs: dict[tuple[Any, ...], torch.cuda.CUDAGraph] = field(default_factory=dict)

    @classmethod
    def allocate(
        cls,
        model: Any,
        device: torch.device,
        rows: int,
        length: int,
        n_kv: int,
        head_dim: int,
        n_layers: int,
        vocab: int,
        raw: bool,
    ) -> Workspace:
        """Zeroed buffers for ``rows`` x ``length`` slots of ``model`` (an HF Llama-family causal LM) on
        ``device``, in the model's dtype; ``raw``: the fused path's logits (model dtype, undivided)."""
        dev, dtype = device, model.lm_head.weight.dtype
        shape = (rows, n_kv, length, head_dim)
        probe = torch.zeros((1, 1, 1), device=dev, dtype=dtype)
        cos, sin = model.model.rotary_emb(probe, torch.arange(length, device=dev).unsqueeze(0))
        return cls(
            rows=rows,
            length=length,
            k=[torch.zeros(shape, device=dev, dtype=dtype) for _ in range(n_layers)],
            v=[torch.zeros(shape, device=dev, dtype=dtype) for _ in range(n_layers)],
            cos=cos[0].contiguous(),
            sin=torch.cat([-sin[0, :, : head_dim // 2], sin[0, :, head_dim // 2 :]], dim=-1),
            tok=torch.zeros(rows, device=dev, dtype=torch.long),
            pos=torch.zeros(rows, device=dev, dtype=torch.long),
            step=torch.zeros(1, device=dev, dtype=torch.long),
            logits=torch.zeros((rows, vocab), device=dev, dtype=dtype if raw else torch.float32),
            tokens=torch.zeros((rows, length), device=dev, dtype=torch.long),
            logprobs=torch.zeros((rows, length), device=dev, dtype=torch.float32),
            slots=torch.arange(length, device=dev),
            raw=raw,
            row_ids=torch.arange(rows, device=dev),
        )

    def window(self, need: int) -> int:
        """KV slots a decode step reads when the live rows use ``need`` of them (a bucket, at most the length)."""
        return min(self.length, -(-need // WINDOW_STEP) * WINDOW_STEP if need <= FINE_WINDOWS else bucket(need))

    def fits_sampling(self, sampling: BatchSampling) -> bool:
        """Whether the workspace's sampling tensors can take ``sampling`` in place (else they are reallocated, and
        graphs that read the old ones must go first)."""
        return self.sampling is not None and self.sampling.blocked.shape[1] >= sampling.blocked.shape[1]

    def load_sampling(self, sampling: BatchSampling, n: int) -> None:
        """Copy a batch's sampling tensors into the workspace's own (a graph reads those addresses); rows past
        ``n`` are idle padding."""
        width = sampling.blocked.shape[1]
        if not self.fits_sampling(sampling):
            dev, rows = self.tok.device, self.rows
            self.sampling = BatchSampling(
                temperature=torch.ones(rows, device=dev),
                greedy=torch.ones(rows, dtype=torch.bool, device=dev),
                top_p=torch.ones(rows, device=dev),
                top_k=torch.ones(rows, dtype=torch.long, device=dev),
                min_new=torch.zeros(rows, dtype=torch.long, device=dev),
                blocked=torch.zeros((rows, max(8, width)), dtype=torch.long, device=dev),
                draws=torch.zeros((rows, self.length), device=dev),
                needs_sort=False,
                any_sampled=False,
                any_blocked=False,
            )
        w = self.sampling
        assert w is not None
        steps = min(self.length, sampling.draws.shape[1])
        blocked = sampling.blocked[:, :1].expand(n, w.blocked.shape[1]).clone()
        blocked[:, :width] = sampling.blocked
        for t, src, idle in (
            (w.temperature, sampling.temperature, 1.0),
            (w.greedy, sampling.greedy, True),
            (w.top_p, sampling.top_p, 1.0),
            (w.top_k, sampling.top_k, 1),
            (w.min_new, sampling.min_new, 0),
            (w.blocked, blocked, 0),
        ):
            t[n:].fill_(idle)
            t[:n].copy_(src)
        w.draws.zero_()
        w.draws[:n, :steps].copy_(sampling.draws[:, :steps])
        self.sampling = replace(
            w, needs_sort=sampling.needs_sort, any_sampled=sampling.any_sampled, any_blocked=sampling.any_blocked
        )

    def sampling_rows(self, b: int) -> BatchSampling:
        """Views of the first ``b`` rows' sampling tensors (views, not copies: a graph must read the workspace's
        own storage)."""
        s = self.sampling
        assert s is not None
        return BatchSampling(
            s.temperature[:b],
            s.greedy[:b],
            s.top_p[:b],
            s.top_k[:b],
            s.min_new[:b],
            s.blocked[:b],
            s.draws[:b],
            s.needs_sort,
            s.any_sampled,
            s.any_blocked,
        )

    def read(self, b: int, s0: int, s1: int) -> tuple[list[list[int]], list[list[float]]]:
        """Tokens and logprobs of steps ``s0..s1-1`` of rows ``:b`` (one host synchronisation)."""
        return self.tokens[:b, s0:s1].tolist(), self.logprobs[:b, s0:s1].tolist()

    def keep(self, b: int, rows: list[int]) -> None:
        """Move rows ``rows`` (of ``:b``) to the front, in that order: their KV cache, state and sampling."""
        assert self.sampling is not None
        index = torch.tensor(rows, device=self.tok.device)
        n = len(rows)
        for t in (*self.k, *self.v, self.tok, self.pos, self.logits, self.tokens, self.logprobs):
            t[:n].copy_(t[:b].index_select(0, index))
        s = self.sampling
        for t in (s.temperature, s.greedy, s.top_p, s.top_k, s.min_new, s.blocked, s.draws):
            t[:n].copy_(t[:b].index_select(0, index))
