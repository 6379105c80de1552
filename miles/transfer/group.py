"""The weight-update process group, formed the way SGLang forms it.

Trainer rank 0 and every engine rank meet in a process group of their own,
outside the trainer's default group (a trainer job already has one, an SGLang
server has its own TP group). SGLang's side of the handshake is
``/init_weights_update_group`` -> ``init_custom_process_group`` in
``sglang/srt/utils/common.py`` (0.5.20): a ``tcp://master_address:master_port``
rendezvous (rank 0 hosts the TCP store), the store wrapped in a ``PrefixStore``
named after the group, and a group built with torch's
``_new_process_group_helper`` with no global-rank list, group rank == rank.

The trainer must join with the identical recipe, otherwise the two sides write
different store keys and wait on each other until the timeout. So the trainer
(:mod:`miles.transfer.sync`) and the embedded engine (:mod:`miles.engine.server`)
both call :func:`join_group` below; the SGLang integration tests run the trainer side against a
real SGLang server.

Collectives on the returned group use group rank 0 as the source
(``dist.broadcast(t, src=0, group=pg)``); the group-rank map is set to the
identity, as SGLang does, so ``src=0`` means the trainer on both sides.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist


def join_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str = "gloo",
    timeout_s: float = 300.0,
) -> Any:
    """Join (rank 0: host) the weight-update group; returns the process group.

    Blocks until all ``world_size`` ranks joined or ``timeout_s`` passed.
    ``backend`` is ``gloo`` on CPUs and ``nccl`` on GPUs, as in SGLang's request.
    """
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    if not group_name:
        raise ValueError("group_name must not be empty")
    timeout = timedelta(seconds=timeout_s)
    host = f"[{master_address}]" if ":" in master_address and not master_address.startswith("[") else master_address
    store, rank, world_size = next(rendezvous(f"tcp://{host}:{master_port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        store,
        group_name=group_name,  # type: ignore[arg-type]  # torch's GroupName is a str NewType
        backend_options=None,
        timeout=timeout,
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def leave_group(pg: Any) -> None:
    """Destroy a group made by :func:`join_group` (SGLang's /destroy_weights_update_group)."""
    dist.destroy_process_group(pg)
