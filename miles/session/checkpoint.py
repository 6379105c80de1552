"""The run's state between rollouts, and its checkpoints: the whole RL state saved and resumed exactly.

Exact resume rests on three facts kept here: every random choice is a pure
function of seeds and the rollout id (prompt order, sampling seeds), the
checkpoint taken before rollout ``k`` holds the state *as of the start* of
rollout ``k`` (so a save in the middle of a rollout redoes it from the start),
and the engines are given the actor's exact weights right after a resume
(the loop's first sync).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from miles import fault
from miles.ckpt.state import binding_fields, capture_rng, check_resumable, restore_rng
from miles.ckpt.store import CheckpointStore, write_json_atomic
from miles.session.asynchronous import Generated
from miles.session.components import Components, broadcast
from miles.spec.tables import Spec

log = logging.getLogger("miles.loop")

PENDING = "pending_rollout.json"
"""The rollout generated ahead of the checkpoint's next rollout (``[run] train_async``), in the checkpoint."""

BUFFER = "partial_rollout_buffer.json"
"""The surplus groups carried over to the checkpoint's next rollout (``[rollout] partial_rollout``)."""


@dataclass
class RunState:
    """Where the run stands: the next rollout to run and the version of the weights the engines hold."""

    next_rollout: int = 0
    weight_version: int = 0
    saved_at: int | None = None
    """The rollout before which the newest checkpoint of this process was taken (or resumed from)."""
    evaluated: int | None = None
    """The step (rollouts trained) of the last evaluation that ran (:mod:`miles.session.evaluation`)."""
    pending: Generated | None = None
    """Driver, ``[run] train_async``: rollout ``next_rollout``, generated ahead and not yet trained on."""


@dataclass(frozen=True)
class RolloutStart:
    """State captured when a rollout begins: what a save must restore if the run stops before it trains."""

    dataset: dict[str, Any] | None
    rng: dict[str, Any]
    pending: Generated | None = None
    """The rollout generated ahead that this rollout trains on (async), restored with the cursor after it."""
    buffer: dict[str, Any] | None = None
    """The partial-rollout buffer (driver, ``partial_rollout``): what this rollout continues, with the cursor."""


def capture(parts: Components, pending: Generated | None = None) -> RolloutStart:
    """The data cursor and partial-rollout buffer (driver), this rank's RNG states and the rollout generated ahead,
    as of now."""
    dataset = parts.driver.dataset.state_dict() if parts.driver else None
    buffer = parts.driver.partial.state_dict() if parts.driver and parts.driver.partial else None
    return RolloutStart(dataset=dataset, rng=capture_rng(), pending=pending, buffer=buffer)


def resume(parts: Components, spec: Spec) -> RunState:
    """Load the newest complete checkpoint into the actor, RNGs and dataset; a fresh state when there is none."""
    found = None
    if parts.driver is not None:
        load_root = Path(spec.ckpt.load) if spec.ckpt.load else parts.store.root
        found = CheckpointStore(load_root, spec.ckpt.keep_last).newest_valid()
    found = broadcast(None if found is None else (found[0], str(found[1])))
    if found is None:
        return RunState()
    rollout_id, path = found[0], Path(found[1])
    driver_state = json.loads((path / "driver.json").read_text())
    check_resumable(driver_state["spec"], spec, str(path))
    parts.actor.load(str(path / "actor"))
    rng_file = path / "rng" / f"rank-{dist.get_rank()}.json"
    if rng_file.exists():
        restore_rng(json.loads(rng_file.read_text()))
    pending = None
    if parts.driver is not None:
        parts.driver.dataset.load_state_dict(driver_state["dataset"])
        if (path / BUFFER).exists():
            buffer = json.loads((path / BUFFER).read_text())
            if parts.driver.partial is not None:
                parts.driver.partial.load_state_dict(buffer)
            elif buffer["groups"]:
                print(
                    f"miles: {path} carries {len(buffer['groups'])} partial-rollout groups over and [rollout] "
                    "partial_rollout is off now: they are dropped",
                    flush=True,
                )
        if (path / PENDING).exists():
            pending = Generated.from_json(json.loads((path / PENDING).read_text()))
        print(f"miles: resumed from {path} at rollout {rollout_id}", flush=True)
    return RunState(
        next_rollout=rollout_id,
        weight_version=driver_state["weight_version"],
        saved_at=rollout_id,
        evaluated=driver_state.get("evaluated"),
        pending=pending,
    )


def save(
    parts: Components, spec: Spec, state: RunState, run_dir: Path, next_rollout: int, start: RolloutStart | None = None
) -> None:
    """Collective save of the whole RL state as the checkpoint before ``next_rollout``.

    ``start`` is given when ``next_rollout`` is the rollout in progress (a stop before it
    trained): the data cursor and RNG states are then those captured when it began, so a
    resume redoes it.
    """
    t0 = time.perf_counter()
    rank = dist.get_rank()
    partial: Path | None = parts.store.partial_dir(next_rollout) if parts.is_driver else None
    partial = Path(broadcast(str(partial) if partial else None))
    parts.actor.save(str(partial / "actor"))
    (partial / "rng").mkdir(exist_ok=True)
    write_json_atomic(partial / "rng" / f"rank-{rank}.json", start.rng if start else capture_rng())
    dist.barrier()
    fault.point("save", next_rollout, run_dir, rank)
    if parts.driver is not None:
        dataset_state = start.dataset if start else parts.driver.dataset.state_dict()
        pending = start.pending if start else state.pending
        if pending is not None:  # async: the rollout generated ahead goes with the cursor after its prompts
            write_json_atomic(partial / PENDING, pending.to_json())
        if parts.driver.partial is not None:  # the carried-over groups go with the cursor that drew them
            buffer = start.buffer if start else parts.driver.partial.state_dict()
            write_json_atomic(partial / BUFFER, buffer)
        write_json_atomic(
            partial / "driver.json",
            {
                "rollout_id": next_rollout,
                "weight_version": state.weight_version,
                "actor_step": parts.actor.step,
                "evaluated": state.evaluated,
                "dataset": dataset_state,
                "spec": binding_fields(spec),
                "rollout_seed": spec.rollout.rollout_seed,
            },
        )
        final = parts.store.commit(partial, next_rollout)
        log.info("saved %s in %.2fs", final, time.perf_counter() - t0)
    dist.barrier()
    hf_dir = hf_export_dir(spec, next_rollout)
    if hf_dir is not None:
        export_hf(parts, hf_dir)
    state.saved_at = next_rollout


def hf_export_dir(spec: Spec, next_rollout: int) -> Path | None:
    """Where ``[ckpt] save_hf`` exports HF weights with the checkpoint before ``next_rollout`` (None: no export)."""
    if not spec.ckpt.save_hf:
        return None
    return Path(spec.ckpt.save_hf.replace("{rollout_id}", str(next_rollout)))


def save_due(spec: Spec, rollout_id: int) -> bool:
    """Whether ``[ckpt] save_interval`` asks for a checkpoint after ``rollout_id``."""
    interval = spec.ckpt.save_interval
    return interval is not None and (rollout_id + 1) % interval == 0


def export_hf(parts: Components, out: Path) -> None:
    """Write the actor's weights as an HF directory, atomically (collective)."""
    tmp = out.with_name(f".{out.name}.partial")
    if parts.is_driver:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    parts.actor.save_hf(str(tmp))
    if parts.is_driver:
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    dist.barrier()
