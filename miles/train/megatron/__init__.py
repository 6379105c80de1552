"""The Megatron-core training backend (``[perf] backend = "megatron"``): TP, PP and EP on ``GPTModel``.

Modules: :mod:`.config` (HF config.json -> TransformerConfig), :mod:`.mapping`
(HF <-> Megatron weight tables per family), :mod:`.weights` (load, export and
HF checkpoint writing), :mod:`.model` (process groups, model build),
:mod:`.logprobs` (vocab-parallel log-probs and entropy), :mod:`.actor` (the
:class:`miles.train.actor.Actor`). megatron-core itself is imported lazily,
so importing this package needs only torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from miles.train.actor import ActorConfig, TrainerContext
    from miles.train.megatron.actor import MegatronActor


def build_megatron_actor(cfg: ActorConfig, ctx: TrainerContext) -> MegatronActor:
    """Build the Megatron actor on this trainer rank, on the planner's ``ctx.mesh`` (collective over all trainer
    ranks).
    """
    from miles.train.megatron.actor import MegatronActor  # deferred: imports megatron-core, only when this backend runs

    return MegatronActor(cfg, ctx)


__all__ = ["build_megatron_actor"]
