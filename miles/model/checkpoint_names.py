"""Checkpoint names versus a transformers model's own parameter names.

transformers 5 loads some families through weight conversions: Qwen3-MoE's
per-expert ``mlp.experts.{e}.gate_proj.weight`` / ``up_proj`` / ``down_proj``
become two fused parameters per layer, ``mlp.experts.gate_up_proj`` and
``mlp.experts.down_proj``. Checkpoints on disk, SGLang's weight loader and the
Megatron export all speak the *checkpoint* names. So everything miles sends or
writes (weight sync buckets, HF exports, the checksums that verify a sync) uses
checkpoint names, and this module converts at the two edges:

* :func:`to_checkpoint_names` on the trainer side: the model's named tensors in,
  checkpoint-named tensors out, using transformers' own reverse conversion
  (what ``save_pretrained`` does), one decoder layer at a time so memory stays
  bounded by one layer's weights;
* :class:`FusedTargets` on the engine side: where a checkpoint-named tensor lands
  inside a fused parameter. It is derived by pushing each fused parameter's
  element indices through the same reverse conversion, so no per-family table
  is needed and any conversion transformers defines is followed exactly.

Families without conversions (Qwen2, Qwen3 dense, Llama) pass through untouched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch

LAYER_PREFIX = re.compile(r"^(.*?\.layers\.\d+\.)")
"""The decoder-layer prefix of a parameter name; conversions never cross layers."""


def conversions(model: Any) -> list[Any]:
    """transformers' weight conversions for ``model`` (empty for families loaded name for name)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:  # transformers 4 loads every family name for name
        return []
    found = get_model_conversion_mapping(model, add_legacy=False)
    return [c for c in found if not isinstance(c, PrefixChange)]


def _revert(model: Any, group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, group))


def to_checkpoint_names(model: Any, named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``named`` under checkpoint names, one decoder layer at a time.

    ``named`` must list each layer's tensors together (``named_parameters`` order).
    Collective exports stay collective: the input is always walked to its end.
    """
    if not conversions(model):
        yield from named
        return
    group: dict[str, torch.Tensor] = {}
    prefix: str | None = None
    for name, tensor in named:
        here = _prefix(name)
        if group and here != prefix:
            yield from _revert(model, group).items()
            group = {}
        prefix = here
        group[name] = tensor
    if group:
        yield from _revert(model, group).items()


class FusedTargets:
    """Where checkpoint-named tensors land in a model with fused parameters (the engine side).

    ``locate(name)`` gives the model's parameter name and, shaped like the
    checkpoint tensor, the flat element indices of that parameter it fills, or None for a name the model
    holds as it is. Index maps are built lazily, one layer at a time, and kept.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.enabled = bool(conversions(model))
        self._params = dict(model.state_dict()) if self.enabled else {}
        self._located: dict[str, tuple[str, torch.Tensor]] = {}
        self._done_prefixes: set[str | None] = set()

    def locate(self, name: str) -> tuple[str, torch.Tensor] | None:
        if not self.enabled or name in self._params:
            return None
        prefix = _prefix(name)
        if prefix not in self._done_prefixes:
            self._index_layer(prefix)
        return self._located.get(name)

    def _index_layer(self, prefix: str | None) -> None:
        """Push the layer's element indices through its reverse conversion.

        Each parameter's indices are offset by the sizes of those before it, so
        an index names both the fused parameter and the element inside it.
        """
        members = [n for n in self._params if _prefix(n) == prefix]
        starts: list[tuple[int, str]] = []
        indices: dict[str, torch.Tensor] = {}
        offset = 0
        for n in members:
            t = self._params[n]
            indices[n] = torch.arange(offset, offset + t.numel()).view(t.shape)
            starts.append((offset, n))
            offset += t.numel()
        for ckpt_name, idx in _revert(self.model, indices).items():
            if ckpt_name in self._params or idx.numel() == 0:
                continue
            flat = idx.reshape(-1)
            first = int(flat[0])
            begin, owner = max((s, n) for s, n in starts if s <= first)
            self._located[ckpt_name] = (owner, idx - begin)
        self._done_prefixes.add(prefix)


def _prefix(name: str) -> str | None:
    match = LAYER_PREFIX.match(name)
    return match.group(1) if match else None
