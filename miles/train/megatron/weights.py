"""Move weights between an HF checkpoint and a parallel Megatron model.

Loading needs no communication: every rank reads only the HF tensors of its
own parameters from the safetensors files and keeps its slice.

Export is collective. For each HF tensor, in checkpoint order, the ranks of
the one replica that holds it (its pipeline stage, its expert-parallel rank,
data-parallel rank 0) all-gather the TP (or expert-TP) slices; the first of
them sends the full tensor to trainer rank 0, the weight-sync source. The same
iterator writes HF checkpoints (:mod:`miles.train.hf_checkpoint`) and fills the
engines' sync buckets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from miles.train.megatron.config import HFArch
from miles.train.megatron.mapping import ParamRule, canonical_name, from_megatron, hf_shapes, param_rules, to_megatron


class _Placement:
    """Where this rank sits in Megatron's mesh, read once from ``parallel_state``."""

    def __init__(self, arch: HFArch) -> None:
        from megatron.core import parallel_state as ps

        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
        if arch.num_experts:
            self.ep_rank = ps.get_expert_model_parallel_rank()
            self.ep_size = ps.get_expert_model_parallel_world_size()
            self.etp_rank = ps.get_expert_tensor_parallel_rank()
            self.etp_size = ps.get_expert_tensor_parallel_world_size()
            self.etp_group = ps.get_expert_tensor_parallel_group()
            self.edp_rank = ps.get_expert_data_parallel_rank()
        else:
            self.ep_rank, self.ep_size, self.etp_rank, self.etp_size, self.edp_rank = 0, 1, 0, 1, 0
            self.etp_group = self.tp_group
        self.local_experts = arch.num_experts // self.ep_size if arch.num_experts else 0
        self.layers_per_stage = arch.num_layers // self.pp_size

    def owns(self, rule: ParamRule) -> bool:
        """This rank is in the replica that exports ``rule`` (it takes part in the gather)."""
        if rule.layer is not None:
            stage = rule.layer // self.layers_per_stage
        elif rule.mcore.startswith("embedding."):
            stage = 0
        else:
            stage = self.pp_size - 1
        if stage != self.pp_rank:
            return False
        if rule.expert is not None:
            return rule.expert // self.local_experts == self.ep_rank and self.edp_rank == 0
        return self.dp_rank == 0

    def split(self, rule: ParamRule) -> tuple[int, int, Any]:
        """(rank, size, group) of the tensor-parallel split that ``rule`` uses."""
        if rule.expert is not None:
            return self.etp_rank, self.etp_size, self.etp_group
        return self.tp_rank, self.tp_size, self.tp_group


def local_parameters(model: Any, arch: HFArch) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters by canonical name (global layer and expert indices)."""
    from megatron.core import parallel_state as ps

    layers = getattr(getattr(model, "decoder", None), "layers", [])
    numbers = {i: layer.layer_number - 1 for i, layer in enumerate(layers)}
    offset = 0
    if arch.num_experts:
        offset = ps.get_expert_model_parallel_rank() * (arch.num_experts // ps.get_expert_model_parallel_world_size())
    return {canonical_name(n, numbers, offset): p for n, p in model.named_parameters()}


class SafetensorsReader:
    """Reads single HF tensors lazily from ``model.safetensors`` or a sharded index."""

    def __init__(self, model_dir: str) -> None:
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            self.files = {k: os.path.join(model_dir, v) for k, v in weight_map.items()}
        else:
            from safetensors import safe_open

            path = os.path.join(model_dir, "model.safetensors")
            with safe_open(path, "pt") as f:
                self.files = {k: path for k in f.keys()}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise KeyError(f"{name} is not in the HF checkpoint")
        with safe_open(self.files[name], "pt") as f:
            return f.get_tensor(name)


def mark_tensor_parallel(model: Any, arch: HFArch) -> None:
    """Tag each split parameter with Megatron's ``tensor_model_parallel`` attributes.

    Megatron sets them only while it initialises weights; miles builds with
    ``perform_initialization=False`` (the HF checkpoint overwrites every weight),
    and without the tags Megatron's gradient-norm (clipping) counts TP slices as
    duplicates and drops all but rank 0's.
    """
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    by_name = {r.mcore: r for r in param_rules(arch)} | {a: r for r in param_rules(arch) for a in r.aliases}
    for name, param in local_parameters(model, arch).items():
        kind = by_name[name].kind
        if kind != "replicated" and not hasattr(param, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(param, True, 1 if kind == "row" else 0, 1)


@torch.no_grad()
def load_hf_weights(model: Any, arch: HFArch, model_dir: str) -> None:
    """Fill this rank's parameters of ``model`` from the HF checkpoint in ``model_dir``."""
    place = _Placement(arch)
    reader = SafetensorsReader(model_dir)
    by_name: dict[str, ParamRule] = {}
    for rule in param_rules(arch):
        by_name[rule.mcore] = rule
        for alias in rule.aliases:
            by_name[alias] = rule
    for name, param in local_parameters(model, arch).items():
        found = by_name.get(name)
        if found is None:
            raise KeyError(f"Megatron parameter {name} has no HF mapping for family {arch.family}")
        rank, size, _ = place.split(found)
        value = to_megatron(found, [reader.get(n) for n in found.hf], arch, rank, size)
        if value.shape != param.shape:
            raise ValueError(f"{name}: HF gives shape {tuple(value.shape)}, Megatron expects {tuple(param.shape)}")
        param.data.copy_(value.to(dtype=param.dtype, device=param.device))


@torch.no_grad()
def export_hf_weights(
    model: Any, arch: HFArch, device: torch.device, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` in checkpoint order; tensors are complete on global rank 0 only.

    Collective over every trainer rank. Every tensor is cast to ``dtype``
    (default: the model's ``params_dtype``) before it travels: Megatron keeps
    some parameters (its norms) in another dtype than the rest, and the
    receiving rank must know the size of what it receives. Other ranks get an
    empty placeholder of the right shape and dtype (they must iterate to the
    end but not use it).
    """
    dtype = dtype or model.config.params_dtype
    place = _Placement(arch)
    params = local_parameters(model, arch)
    rules = param_rules(arch)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    # Which global rank sends each rule: the owning replica's TP rank 0. One small all-gather up front.
    mine = [i for i, r in enumerate(rules) if place.owns(r) and place.split(r)[0] == 0]
    sources: list[int] = [0] * len(rules)
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        for r, idxs in enumerate(gathered):
            for i in idxs:
                sources[i] = r
    for i, rule in enumerate(rules):
        hf: list[torch.Tensor] | None = None
        if place.owns(rule):
            local = params[rule.mcore].detach()
            _, size, group = place.split(rule)
            if size > 1:
                shards = [torch.empty_like(local) for _ in range(size)]
                dist.all_gather(shards, local.contiguous(), group=group)
            else:
                shards = [local]
            hf = [t.to(dtype) for t in from_megatron(rule, shards, arch)]
        src = sources[i]
        if world > 1 and src != 0:
            if rank == src:
                assert hf is not None
                for t in hf:
                    dist.send(t.contiguous().to(device), dst=0)
            elif rank == 0:
                hf = [_recv(_hf_shape(rule, j, arch), dtype, device, src) for j in range(len(rule.hf))]
        for j, name in enumerate(rule.hf):
            if rank == 0 or (hf is not None and rank == src):
                assert hf is not None
                yield name, hf[j]
            else:
                yield name, torch.empty(_hf_shape(rule, j, arch), dtype=dtype, device=device)


def _hf_shape(rule: ParamRule, j: int, arch: HFArch) -> tuple[int, ...]:

    return hf_shapes(arch)[rule.hf[j]]


def _recv(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, src: int) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(t, src=src)
    return t
