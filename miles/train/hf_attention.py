"""The attention implementation the FSDP actor's HF models run: SDPA for padded rows, document attention for packed.

transformers builds one attention mask per forward from the model's
``attn_implementation`` and hands it, with each layer's q/k/v, to that
implementation's attention function. For a packed row (restarting
``position_ids``, no padding mask) its ``"sdpa"`` mask builder makes an
explicit block-diagonal causal ``[t, t]`` mask, so every query scores every
key of the row. :data:`ATTENTION` registers a name with both of transformers'
interfaces:

* its mask builder is transformers' SDPA one whenever a padding mask is given
  (padded rows get exactly the mask and the SDPA call they had under
  ``"sdpa"``) and builds nothing when there is none;
* its attention function runs :func:`miles.train.document_attention.document_attention`
  when the forward carries the row's ``documents`` (:class:`Documents`; the
  model passes forward keyword arguments down to every attention call), and
  transformers' SDPA function otherwise. A mask-less forward without
  ``documents`` is one causal sequence per row, which SDPA's ``is_causal``
  computes; a packed row must therefore always come with its ``documents``,
  which :func:`packed_forward_kwargs` builds.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from miles.train.document_attention import Documents, document_attention

ATTENTION = "miles_documents"
"""The ``attn_implementation`` name the FSDP actor loads its models with."""


def _mask(**kwargs: Any) -> Any:
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        # Causal within the row or within each document: the attention function knows which, and needs no mask.
        return None
    return sdpa_mask(**kwargs)


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    documents: Documents | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if documents is None:
        return sdpa_attention_forward(  # type: ignore[no-any-return]
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("a packed forward is one row without an attention mask")
    if dropout > 0.0 or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError("packed attention takes no dropout, logit soft-capping or attention sinks")
    window = kwargs.get("sliding_window")
    if window is not None and documents.max_len > window:
        raise ValueError(f"a sliding-window layer ({window} tokens) needs the padded layout for longer documents")
    # transformers' [1, heads, t, d] -> the packed [t, heads, d], and back as [1, t, heads, d]
    out = document_attention(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), documents, scale=scaling
    )
    return out.unsqueeze(0), None


@functools.cache
def register() -> str:
    """Register :data:`ATTENTION` with transformers (once per process) and return its name for ``from_pretrained``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, _mask)
    return ATTENTION


def packed_forward_kwargs(seq_lens: Sequence[int], device: torch.device) -> dict[str, Any]:
    """The forward keyword arguments of a packed row of documents of ``seq_lens`` tokens: the row's
    :class:`Documents`, which transformers passes down to :func:`_attention` in every layer."""
    return {"documents": Documents(seq_lens, device)}
