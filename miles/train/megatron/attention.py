"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for Megatron's local layer spec.

Megatron's local ``DotProductAttention`` materialises the ``[b, heads, s, s]``
score matrix and runs the softmax in fp32 as separate kernels; at sequence
2048 that dominates a ~1B model's step (19.8% MFU measured with it;
on one H100 this module took a Llama-3.2-1B step from 12.5% to 22.4% MFU).
Without Transformer Engine, torch's SDPA is the fused kernel at hand (flash or
memory-efficient attention on GPUs, a fused math path on CPUs). This module
has the same constructor and forward signature as Megatron's core attention,
so it drops into the spec (``[perf] attention_backend = "sdpa"``). Imported
only when that spec is built (it needs megatron-core).

It is also miles' context-parallel attention (``[perf] cp > 1``; Megatron's
own needs Transformer Engine): each rank gathers the keys and values of the
whole sequence (:class:`miles.train.megatron.context.ContextLayout`) and
attends with its two query chunks. Chunk ``j`` of length ``c`` sees keys
``[0, (j + 1) c)`` under a causal mask aligned to the bottom-right corner
(torch's ``causal_lower_right``, which the flash and memory-efficient
kernels take natively), so no ``[s, s]`` mask is ever built on GPUs.

It is also miles' packed attention (``[train] qkv_format = "thd"``; Megatron's
needs Transformer Engine): a micro-batch's documents sit back to back in one
row and Megatron hands the core attention ``[t, heads, head_dim]`` with the
documents' boundaries (:func:`document_params`, whose ``cu_seqlens`` also make
Megatron's RoPE restart per document). Each document attends causally to
itself only, through :func:`miles.train.document_attention.document_attention`
(varlen flash attention or FlexAttention on GPUs, SDPA over documents grouped
by length on CPUs), so no ``[t, t]`` mask is built, no query computes scores
against another document's keys, and no Python loop runs over the documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from torch.nn import functional as F
from torch.nn.attention.bias import causal_lower_right

from miles.train.document_attention import Documents, document_attention
from miles.train.megatron.context import ContextLayout


@dataclass
class DocumentParams(PackedSeqParams):  # type: ignore[misc]
    """Megatron's packed-sequence parameters plus the row's :class:`Documents` (host lengths, so no device sync per
    layer, and what every layer's document attention reuses)."""

    documents: Documents | None = None


def document_params(seq_lens: Sequence[int], device: torch.device) -> DocumentParams:
    """The ``thd`` parameters of a row of documents of ``seq_lens`` tokens (queries and keys alike)."""
    docs = Documents(seq_lens, device)
    return DocumentParams(
        qkv_format="thd",
        cu_seqlens_q=docs.cu_seqlens,
        cu_seqlens_kv=docs.cu_seqlens,
        max_seqlen_q=docs.max_len,
        max_seqlen_kv=docs.max_len,
        documents=docs,
    )


class SdpaAttention(MegatronModule):  # type: ignore[misc]
    """Causal self-attention over ``[s, b, heads, head_dim]`` inputs, output ``[s, b, heads * head_dim]``; a packed
    row (``packed_seq_params``) comes as ``[t, heads, head_dim]`` and goes out as ``[t, heads * head_dim]``."""

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str,
        cp_comm_type: str | None = None,
        softmax_scale: float | None = None,
        pg_collection: Any = None,
        **_: Any,
    ) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.enums import AttnMaskType

        super().__init__(config=config)
        tp = pg_collection.tp.size() if pg_collection is not None else ps.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.groups = (config.num_query_groups or config.num_attention_heads) // tp
        self.scale = softmax_scale
        self.causal = attn_mask_type == AttnMaskType.causal
        self.dropout = config.attention_dropout
        self.cp_size = config.context_parallel_size
        self._layout: ContextLayout | None = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
        **_: Any,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SdpaAttention takes no attention bias")
        if packed_seq_params is not None:
            docs = packed_seq_params.documents if isinstance(packed_seq_params, DocumentParams) else None
            if docs is None or self.cp_size > 1 or not self.causal:
                raise ValueError(
                    "packed SdpaAttention takes miles' DocumentParams, causal, without context parallelism"
                )
            if self.training and self.dropout > 0.0:
                raise ValueError("packed SdpaAttention takes no attention dropout")
            return document_attention(query, key, value, docs, scale=self.scale).reshape(query.shape[0], -1)
        sq, b = query.shape[0], query.shape[1]
        if self.cp_size > 1:
            if attention_mask is not None or not self.causal:
                raise ValueError("context-parallel attention is causal and takes no explicit mask")
            return self._context_parallel(query, key, value).reshape(sq, b, -1)
        q = query.permute(1, 2, 0, 3)  # [b, heads, s, d]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if self.groups != self.heads:  # GQA: every kernel takes repeated KV heads
            k = k.repeat_interleave(self.heads // self.groups, dim=1)
            v = v.repeat_interleave(self.heads // self.groups, dim=1)
        dropout = self.dropout if self.training else 0.0
        if attention_mask is None:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=self.causal and sq > 1, scale=self.scale
            )
        else:  # Megatron's masks are True where attention is *forbidden*; SDPA's boolean masks the opposite
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=~attention_mask, dropout_p=dropout, scale=self.scale
            )
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _context_parallel(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """This rank's two query chunks against the gathered keys/values; ``[s_local, b, heads, d]``."""
        if self._layout is None:
            self._layout = ContextLayout.current()
        layout = self._layout
        kv = layout.gather_keys_values(torch.cat([key, value], dim=-1), dim=0)  # one collective for both
        k, v = kv.split([key.shape[-1], value.shape[-1]], dim=-1)
        k, v = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)  # [b, groups, S, d]
        if self.groups != self.heads:
            k = k.repeat_interleave(self.heads // self.groups, dim=1)
            v = v.repeat_interleave(self.heads // self.groups, dim=1)
        q = query.permute(1, 2, 0, 3)
        c = q.shape[2] // 2
        dropout = self.dropout if self.training else 0.0
        outs = []
        for half, chunk in enumerate(layout.chunks):
            visible = (chunk + 1) * c
            q_half = q[:, :, half * c : (half + 1) * c]
            k_vis, v_vis = k[:, :, :visible], v[:, :, :visible]
            if chunk == 0:  # square: the ordinary causal mask
                out = F.scaled_dot_product_attention(
                    q_half, k_vis, v_vis, dropout_p=dropout, is_causal=True, scale=self.scale
                )
            else:
                out = F.scaled_dot_product_attention(
                    q_half, k_vis, v_vis, attn_mask=causal_lower_right(c, visible), dropout_p=dropout, scale=self.scale
                )
            outs.append(out)
        return torch.cat(outs, dim=2).permute(2, 0, 1, 3)
