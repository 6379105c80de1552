"""HF <-> Megatron weight mapping for every supported family, in one table.

A :class:`ParamRule` ties one Megatron parameter (named canonically: global
layer index, global expert index) to the HF checkpoint tensors it is made
of, and says how it is split over tensor-parallel ranks:

* ``replicated``: the same tensor on every rank (norms, router);
* ``column``: rows split over TP (``ColumnParallelLinear``);
* ``row``: columns split over TP (``RowParallelLinear``: ``linear_proj``, ``linear_fc2``);
* ``vocab``: rows split over TP after padding the vocabulary to a multiple of TP;
* ``qkv``: HF ``q_proj``/``k_proj``/``v_proj`` interleaved per query group, Megatron's layout
  ``[g0: q(heads/groups), k, v][g1: ...]``, so a contiguous TP slice holds whole groups;
* ``fc1``: HF ``gate_proj`` and ``up_proj`` fused; each TP rank holds ``[gate_r; up_r]``,
  so the gathered full tensor is *not* ``[gate; up]`` and must be split per shard.

Expert parameters are split the same way over the expert-tensor-parallel
group; which rank holds which expert is expert parallelism, handled by the
caller (:mod:`miles.train.megatron.weights`).

Nothing here touches torch.distributed: these are pure tensor functions,
tested on CPU for shapes and for an exact HF -> Megatron -> HF round trip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from miles.train.megatron.config import HFArch, padded_vocab_size

Kind = Literal["replicated", "column", "row", "vocab", "qkv", "fc1"]


@dataclass(frozen=True)
class ParamRule:
    """One Megatron parameter and the HF tensors it is built from."""

    mcore: str
    """Canonical Megatron name: ``decoder.layers.<global layer>.`` and ``mlp.experts.<global expert>.``."""
    hf: tuple[str, ...]
    """HF checkpoint names, in fusion order (q, k, v / gate, up)."""
    kind: Kind
    layer: int | None = None
    """Global layer index; ``None`` for the embedding, the final norm and the output layer."""
    expert: int | None = None
    """Global expert index for routed-expert weights."""
    aliases: tuple[str, ...] = ()
    """Other Megatron names loaded from the same HF tensors but never exported (the tied output layer)."""


def param_rules(arch: HFArch) -> list[ParamRule]:
    """Every Megatron parameter of ``arch``, in HF checkpoint order (the order of export and weight sync)."""
    rules: list[ParamRule] = []
    tied = ("output_layer.weight",) if arch.tie_word_embeddings else ()
    rules.append(ParamRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", aliases=tied))
    for i in range(arch.num_layers):
        hf = f"model.layers.{i}."
        mc = f"decoder.layers.{i}."
        at = hf + "self_attn."
        qkv = (at + "q_proj.weight", at + "k_proj.weight", at + "v_proj.weight")
        rules.append(ParamRule(mc + "input_layernorm.weight", (hf + "input_layernorm.weight",), "replicated", i))
        rules.append(ParamRule(mc + "self_attention.linear_qkv.weight", qkv, "qkv", i))
        if arch.qkv_bias:
            bias = tuple(n.replace(".weight", ".bias") for n in qkv)
            rules.append(ParamRule(mc + "self_attention.linear_qkv.bias", bias, "qkv", i))
        if arch.qk_norm:
            rules.append(ParamRule(mc + "self_attention.q_layernorm.weight", (at + "q_norm.weight",), "replicated", i))
            rules.append(ParamRule(mc + "self_attention.k_layernorm.weight", (at + "k_norm.weight",), "replicated", i))
        rules.append(ParamRule(mc + "self_attention.linear_proj.weight", (at + "o_proj.weight",), "row", i))
        rules.append(
            ParamRule(mc + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",), "replicated", i)
        )
        if arch.num_experts:
            rules.append(ParamRule(mc + "mlp.router.weight", (hf + "mlp.gate.weight",), "replicated", i))
            for e in range(arch.num_experts):
                ex = f"{hf}mlp.experts.{e}."
                me = f"{mc}mlp.experts.{e}."
                gate_up = (ex + "gate_proj.weight", ex + "up_proj.weight")
                rules.append(ParamRule(me + "linear_fc1.weight", gate_up, "fc1", i, e))
                rules.append(ParamRule(me + "linear_fc2.weight", (ex + "down_proj.weight",), "row", i, e))
        else:
            gate_up = (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight")
            rules.append(ParamRule(mc + "mlp.linear_fc1.weight", gate_up, "fc1", i))
            rules.append(ParamRule(mc + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), "row", i))
    rules.append(ParamRule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"))
    if not arch.tie_word_embeddings:
        rules.append(ParamRule("output_layer.weight", ("lm_head.weight",), "vocab"))
    return rules


def hf_shapes(arch: HFArch) -> dict[str, tuple[int, ...]]:
    """Shape of every HF checkpoint tensor the mapping reads or writes."""
    h, hd = arch.hidden_size, arch.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for rule in param_rules(arch):
        for name in rule.hf:
            if name in shapes:
                continue
            leaf = name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]
            if leaf.endswith("layernorm.weight"):
                shapes[name] = (h,)
            elif leaf in ("q_norm.weight", "k_norm.weight"):
                shapes[name] = (hd,)
            elif leaf == "q_proj.weight":
                shapes[name] = (arch.num_heads * hd, h)
            elif leaf in ("k_proj.weight", "v_proj.weight"):
                shapes[name] = (arch.num_kv_heads * hd, h)
            elif leaf == "q_proj.bias":
                shapes[name] = (arch.num_heads * hd,)
            elif leaf in ("k_proj.bias", "v_proj.bias"):
                shapes[name] = (arch.num_kv_heads * hd,)
            elif leaf == "o_proj.weight":
                shapes[name] = (h, arch.num_heads * hd)
            elif leaf == "gate.weight":
                shapes[name] = (arch.num_experts, h)
            else:
                ffn = arch.moe_ffn_hidden_size if rule.expert is not None else arch.ffn_hidden_size
                shapes[name] = (h, ffn) if leaf == "down_proj.weight" else (ffn, h)
    return shapes


def to_megatron(rule: ParamRule, hf: list[torch.Tensor], arch: HFArch, rank: int, size: int) -> torch.Tensor:
    """The slice of ``rule``'s Megatron parameter held by TP rank ``rank`` of ``size``, built from the HF tensors."""
    if rule.kind == "replicated":
        return hf[0]
    if rule.kind == "column":
        return hf[0].chunk(size, dim=0)[rank]
    if rule.kind == "row":
        return hf[0].chunk(size, dim=1)[rank]
    if rule.kind == "vocab":
        full = hf[0]
        pad = padded_vocab_size(arch, size) - full.shape[0]
        if pad:
            full = torch.cat([full, full.new_zeros((pad, *full.shape[1:]))])
        return full.chunk(size, dim=0)[rank]
    if rule.kind == "fc1":
        gate, up = hf
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]])
    q, k, v = hf
    groups = arch.num_kv_heads
    rest = q.shape[1:]
    fused = torch.cat([q.reshape(groups, -1, *rest), k.reshape(groups, -1, *rest), v.reshape(groups, -1, *rest)], dim=1)
    return fused.reshape(-1, *rest).chunk(size, dim=0)[rank]


def from_megatron(rule: ParamRule, shards: list[torch.Tensor], arch: HFArch) -> list[torch.Tensor]:
    """The HF tensors of ``rule`` from the slices of all TP ranks (in rank order); inverse of :func:`to_megatron`."""
    if rule.kind == "replicated":
        return [shards[0]]
    if rule.kind == "column":
        return [torch.cat(shards, dim=0)]
    if rule.kind == "row":
        return [torch.cat(shards, dim=1)]
    if rule.kind == "vocab":
        return [torch.cat(shards, dim=0)[: arch.vocab_size]]
    if rule.kind == "fc1":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])]
    full = torch.cat(shards, dim=0)
    groups, hd = arch.num_kv_heads, arch.head_dim
    q_per = arch.num_heads // groups * hd
    rest = full.shape[1:]
    grouped = full.reshape(groups, q_per + 2 * hd, *rest)
    q, k, v = grouped.split([q_per, hd, hd], dim=1)
    return [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$")
_TE_FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
"""Transformer Engine's spec fuses the pre-attention and pre-MLP norms into the next linear layer."""


def canonical_name(local: str, layer_numbers: dict[int, int], expert_offset: int) -> str:
    """Megatron's local parameter name on this rank -> the canonical name of :func:`param_rules`.

    ``layer_numbers`` maps the local layer index of this pipeline stage to the
    global one (``TransformerLayer.layer_number - 1``); ``expert_offset`` is the
    global index of this expert-parallel rank's first expert.
    """
    m = _LAYER.match(local)
    if not m:
        return local
    idx, rest = int(m.group(1)), m.group(2)
    rest = _TE_FUSED_NORMS.get(rest, rest)
    e = _EXPERT.match(rest)
    if e:
        rest = f"mlp.experts.{int(e.group(1)) + expert_offset}.{e.group(2)}"
    return f"decoder.layers.{layer_numbers[idx]}.{rest}"
