"""The two decode paths of the embedded engine, behind the one stepping interface its decode loop drives.

:meth:`miles.engine.core.Engine._decode` owns what is the same for every model: when to read tokens back, the
stop rules, aborts, pauses and compacting finished rows. How a step runs is the path's: :class:`StaticBatch` on
:class:`~miles.engine.decoder.StaticDecoder` (static KV buffers, CUDA graphs, rows in power-of-two buckets) for
the Llama family, :class:`HFBatch` on HF's own forward with a ``DynamicCache`` for every other model. Both sample
on the device (:mod:`miles.engine.sampling`) from draws fixed when the batch starts, and record each step's tokens
for the loop to read back.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from miles.engine.decoder import StaticDecoder
from miles.engine.sampling import BatchSampling, block_early_stops, sample_batch


class DecodeBatch(Protocol):
    """One batch being decoded: what :meth:`~miles.engine.core.Engine._decode` drives, whichever forward runs it."""

    rows: int
    input_logprobs: list[list[float | None]]

    def bucket(self, live: int) -> int: ...
    def step(self, b: int, max_pos: int) -> None: ...
    def read(self, b: int, s0: int, s1: int) -> tuple[list[list[int]], list[list[float]]]: ...
    def keep(self, b: int, rows: list[int], new_b: int) -> None: ...
    def refresh(self) -> None: ...


class StaticBatch:
    """A batch on :class:`StaticDecoder` (rows padded to a power-of-two bucket)."""

    def __init__(
        self,
        decoder: StaticDecoder,
        prompts: list[list[int]],
        sampling: BatchSampling,
        want_input: list[bool],
        length: int,
    ) -> None:
        self.decoder = decoder
        self.rows, self.input_logprobs = decoder.start(prompts, sampling, length, want_input)

    def bucket(self, live: int) -> int:
        return 1 << max(live - 1, 0).bit_length()

    def step(self, b: int, max_pos: int) -> None:
        self.decoder.step(b, max_pos)

    def read(self, b: int, s0: int, s1: int) -> tuple[list[list[int]], list[list[float]]]:
        return self.decoder.read(b, s0, s1)

    def keep(self, b: int, rows: list[int], new_b: int) -> None:
        self.decoder.keep(b, rows, new_b)

    def refresh(self) -> None:
        self.decoder.refresh()


class HFBatch:
    """The fallback for models :class:`StaticDecoder` does not run: HF's forward with a ``DynamicCache``.

    Prompts are left-padded and prefilled with an attention mask and explicit position ids; finished rows are
    dropped from the cache (``batch_select_indices``) at each sync point.
    """

    def __init__(
        self,
        model: Any,
        cache_kw: str,
        device: torch.device,
        pad_id: int,
        prompts: list[list[int]],
        sampling: BatchSampling,
        want_input: list[bool],
        steps: int,
    ) -> None:
        from transformers import DynamicCache

        self.model, self.cache_kw, self.s = model, cache_kw, sampling
        dev = device
        n = self.rows = len(prompts)
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - lengths[row] :] = torch.tensor(p)
            mask[row, width - lengths[row] :] = 1
        ids, self.mask = ids.to(dev), mask.to(dev)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache()
        out = self.model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=0 if any(want_input) else 1,
            **{self.cache_kw: self.cache},
        )
        self.input_logprobs: list[list[float | None]] = [[] for _ in range(n)]
        if any(want_input):
            full = torch.log_softmax(out.logits.float(), dim=-1)
            for row, p in enumerate(prompts):
                if want_input[row]:
                    off = width - lengths[row]
                    self.input_logprobs[row] = [None] + [float(full[row, off + t - 1, p[t]]) for t in range(1, len(p))]
        self.logits = out.logits[:, -1, :].float()
        self.tokens = torch.zeros((n, steps), dtype=torch.long, device=dev)
        self.logprobs = torch.zeros((n, steps), dtype=torch.float32, device=dev)
        self.produced = torch.zeros(1, dtype=torch.long, device=dev)

    def bucket(self, live: int) -> int:
        return live

    def step(self, b: int, max_pos: int) -> None:
        s = self.s
        if s.any_blocked:
            block_early_stops(self.logits, self.produced, s.min_new, s.blocked)
        tok, lp = sample_batch(self.logits, s.draws.index_select(1, self.produced).view(-1), s)
        self.tokens.index_copy_(1, self.produced, tok.view(-1, 1))
        self.logprobs.index_copy_(1, self.produced, lp.view(-1, 1))
        self.produced += 1
        if int(self.produced) >= self.tokens.shape[1]:
            return  # the last token any row may produce: no forward needed after it
        self.mask = torch.cat([self.mask, self.mask.new_ones((b, 1))], dim=1)
        out = self.model(
            input_ids=tok.view(-1, 1),
            attention_mask=self.mask,
            position_ids=self.mask.sum(-1, keepdim=True) - 1,
            use_cache=True,
            **{self.cache_kw: self.cache},
        )
        self.logits = out.logits[:, -1, :].float()

    def read(self, b: int, s0: int, s1: int) -> tuple[list[list[int]], list[list[float]]]:
        return self.tokens[:, s0:s1].tolist(), self.logprobs[:, s0:s1].tolist()

    def keep(self, b: int, rows: list[int], new_b: int) -> None:
        index = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.logits = self.mask.index_select(0, index), self.logits.index_select(0, index)
        self.tokens, self.logprobs = self.tokens.index_select(0, index), self.logprobs.index_select(0, index)
        self.s = self.s.select(index)
        self.rows = new_b

    def refresh(self) -> None:
        """Nothing to follow: HF's forward reads the model's parameters themselves, never copies of them."""
