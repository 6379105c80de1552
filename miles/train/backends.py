"""The training backends by name: ``[perf] backend`` -> the :class:`~miles.train.actor.Actor` that trains.

Kept apart from :mod:`miles.train.actor` (the protocol) so that the protocol
never imports its implementations, and each backend's heavy imports
(torch's FSDP stack, megatron-core) happen only when that backend is chosen.
"""

from __future__ import annotations

from typing import cast

from miles.errors import UserError
from miles.train.actor import Actor, ActorConfig, TrainerContext
from miles.train.megatron import build_megatron_actor


def build_actor(cfg: ActorConfig, ctx: TrainerContext) -> Actor:
    """Build the actor that ``[perf] backend`` selects."""
    backend = cfg.backend
    if backend == "fsdp":
        from miles.train.fsdp import FSDPActor  # deferred: torch's FSDP stack, only when this backend runs

        return FSDPActor(cfg, ctx)
    if backend == "megatron":
        # cast: the Megatron actor is checked against this protocol by its own tests (offload/onload pending there)
        return cast(Actor, build_megatron_actor(cfg, ctx))
    raise UserError(f'[perf] backend = {backend!r} is not a training backend; use "fsdp" or "megatron"')
