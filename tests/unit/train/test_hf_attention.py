"""miles' attention implementation for the FSDP actor's HF models, on every family the backends support.

A packed row (restarting positions, the row's documents, no mask) must give each sequence the logits it gets
alone in a right-padded batch, with one document-attention call per layer and no mask built; a padded batch
must give exactly the logits of transformers' own ``"sdpa"`` implementation.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import miles.train.hf_attention as hf_attention
from miles.train.hf_attention import packed_forward_kwargs, register

EPS32 = torch.finfo(torch.float32).eps
VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 32, 64, 2, 4, 2, 8
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": HEAD_DIM},
    "qwen3_moe": {"head_dim": HEAD_DIM, "moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2},
}
LENS = [5, 1, 7, 7, 3, 7]


def _model(family: str, attn_implementation: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        family,
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        **FAMILIES[family],
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation, dtype=torch.float32).eval()


def _padded(ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    tokens = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, x in enumerate(ids):
        tokens[i, : len(x)], mask[i, : len(x)] = x, 1
    return tokens, mask


def _reorder_bound(row_len: int) -> float:
    """Relative move of the logits when only the order of float32 sums changes (another batching of the same
    per-sequence arithmetic): the recursive-summation bound of each sum on the forward's chain, per layer the
    norm, q/k/v projections, scores, softmax denominator and weighted values (``row_len`` keys), output
    projection, second norm and MLP, then the final norm and the LM head."""
    per_layer = HIDDEN + HIDDEN + HEAD_DIM + 2 * row_len + HEADS * HEAD_DIM + HIDDEN + HIDDEN + INTERMEDIATE
    return (LAYERS * per_layer + HIDDEN + HIDDEN) * EPS32


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_row_equals_padded_batch(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(family, register())
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, VOCAB, (n,), generator=g) for n in LENS]
    calls: list[int] = []
    kernel = hf_attention.document_attention

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return kernel(*args, **kwargs)

    def no_mask(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a packed row built an attention mask")

    row = torch.cat(ids)[None]
    positions = torch.cat([torch.arange(n) for n in LENS])[None]
    with torch.no_grad():
        with monkeypatch.context() as m:
            m.setattr(hf_attention, "document_attention", counted)
            m.setattr("transformers.masking_utils.sdpa_mask", no_mask)
            packed = model(
                input_ids=row, position_ids=positions, use_cache=False, **packed_forward_kwargs(LENS, row.device)
            ).logits[0]
        tokens, mask = _padded(ids)
        padded = model(input_ids=tokens, attention_mask=mask, use_cache=False).logits
    assert len(calls) == LAYERS
    want = torch.cat([padded[i, :n] for i, n in enumerate(LENS)])
    rel = float((packed - want).double().norm() / want.double().norm())
    assert rel <= _reorder_bound(max(LENS)), rel


@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe"])
def test_padded_batches_run_transformers_sdpa_unchanged(family: str) -> None:
    ours, sdpa = _model(family, register()), _model(family, "sdpa")
    g = torch.Generator().manual_seed(2)
    tokens, mask = _padded([torch.randint(1, VOCAB, (n,), generator=g) for n in LENS])
    with torch.no_grad():
        a = ours(input_ids=tokens, attention_mask=mask, use_cache=False).logits
        b = sdpa(input_ids=tokens, attention_mask=mask, use_cache=False).logits
    assert torch.equal(a, b)


def test_packed_attention_refuses_what_it_cannot_compute() -> None:
    docs = packed_forward_kwargs([3, 5], torch.device("cpu"))["documents"]
    q = torch.zeros(1, HEADS, 8, HEAD_DIM)
    kv = torch.zeros(1, KV_HEADS, 8, HEAD_DIM)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="sliding-window"):
        hf_attention._attention(module, q, kv, kv, None, documents=docs, sliding_window=4)
    with pytest.raises(ValueError, match="dropout"):
        hf_attention._attention(module, q, kv, kv, None, documents=docs, dropout=0.1)
    with pytest.raises(ValueError, match="one row"):
        hf_attention._attention(module, q.expand(2, -1, -1, -1), kv, kv, None, documents=docs)
