"""What one trainer rank holds for a whole run, built once at start.

Every rank builds the actor. The driver (trainer rank 0) also owns what talks
to the outside world: the prompt dataset, the engine fleet and the reward; the
other ranks hold ``None`` there and receive each scored rollout from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from miles.ckpt.store import CheckpointStore
from miles.data import PromptDataset
from miles.errors import UserError
from miles.job import rundir
from miles.job.environment import TaskContext
from miles.plan import trainer_mesh
from miles.plan.engine_argv import rollout_offload, train_offload
from miles.reward.filters import load_filter
from miles.reward.model import RewardModel
from miles.rollout.custom import CustomGeneration
from miles.rollout.fleet import (
    EngineFleet,
    FleetConfig,
    driver_router,
    engine_deadline_s,
    local_device,
    trainer_group,
    weight_sync_kind,
)
from miles.rollout.partial import PartialBuffer
from miles.spec.tables import Spec
from miles.train.actor import Actor, ActorConfig, TrainerContext
from miles.train.backends import build_actor
from miles.transfer.colocate import TensorSyncPeer


@dataclass
class Driver:
    """The driver's components (trainer rank 0 only)."""

    dataset: Any
    engines: EngineFleet
    reward: Any
    eval_data: dict[str, Any]
    """``[eval] eval_prompt_data``'s datasets by name (empty without evaluation)."""
    keep: Any = None
    """The dynamic-sampling filter (``[rollout] dynamic_sampling_filter_path``), or ``None``."""
    partial: PartialBuffer | None = None
    """``[rollout] partial_rollout``: the surplus groups carried over to the next rollout (in the checkpoint)."""


@dataclass
class Components:
    actor: Actor
    actor_cfg: ActorConfig
    """What the actor and the batch preparation read of the spec."""
    driver: Driver | None
    """``None`` on every rank but the driver."""
    store: CheckpointStore
    num_rollout: int
    model_dir: str
    offload_train: bool
    """Colocated on GPUs, the actor leaves the GPU while the engines generate (Miles' ``--offload-train``)."""
    offload_rollout: bool
    """... and the engines release their memory while the actor trains (``--offload-rollout``)."""
    sync_peer: Any
    """Colocated tensor sync: a non-driver rank's share of each bucket for the engine on its GPU, else ``None``."""

    @property
    def is_driver(self) -> bool:
        return self.driver is not None


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every trainer rank (collective)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def build(spec: Spec, task: TaskContext) -> Components:
    """Build the actor, and on the driver the dataset, engines and reward (the engines are waited for here)."""
    torch.manual_seed(spec.run.seed)
    run_dir = Path(task.run_dir)
    is_driver = dist.get_rank() == 0
    model_dir = broadcast(rundir.model_dir_of(spec, run_dir) if is_driver else None)
    driver, num_rollout = build_driver(spec, task, model_dir) if is_driver else (None, None)
    num_rollout = broadcast(num_rollout)
    device = torch.device(f"cuda:{task.local_rank}" if task.device == "cuda" else "cpu")
    mesh = trainer_mesh(spec, dist.get_world_size(), model_dir)  # the layout `miles plan` showed, checked again
    actor_cfg = ActorConfig.from_spec(spec)
    actor = build_actor(
        actor_cfg, TrainerContext(model_dir=model_dir, num_rollout=num_rollout, device=device, mesh=mesh)
    )
    sync_peer = None
    if not is_driver and weight_sync_kind(spec, task.device) == "tensor" and trainer_group() is not None:
        sync_peer = TensorSyncPeer(spec.rollout.update_weight_buffer_size, local_device(task), trainer_group())
    return Components(
        actor=actor,
        actor_cfg=actor_cfg,
        driver=driver,
        store=CheckpointStore.of_run(spec.ckpt, run_dir),
        num_rollout=num_rollout,
        model_dir=model_dir,
        offload_train=train_offload(spec, gpu=task.device == "cuda"),
        offload_rollout=rollout_offload(spec, gpu=task.device == "cuda"),
        sync_peer=sync_peer,
    )


def num_rollouts(spec: Spec, num_prompts: int) -> int:
    """The run's length in rollouts: ``[run] num_rollout``, or ``num_epoch`` passes over ``num_prompts`` prompts."""
    if spec.run.num_rollout is not None:
        return spec.run.num_rollout
    assert spec.run.num_epoch is not None and spec.rollout.rollout_batch_size is not None
    num_rollout = spec.run.num_epoch * num_prompts // spec.rollout.rollout_batch_size
    if num_rollout == 0:
        raise UserError(
            f"[run] num_epoch = {spec.run.num_epoch} over {num_prompts} prompts gives no full rollout of "
            f"rollout_batch_size = {spec.rollout.rollout_batch_size}; raise num_epoch or set num_rollout"
        )
    return num_rollout


def build_driver(spec: Spec, task: TaskContext, model_dir: str) -> tuple[Driver, int]:
    """The driver's components and the run's number of rollouts (``num_rollout``, or from ``num_epoch``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=spec.model.trust_remote_code)
    dataset = PromptDataset.from_spec(spec.rollout, tokenizer)
    eval_data = PromptDataset.eval_from_spec(spec.eval, spec.rollout, tokenizer)
    base_dir = Path(spec.source).parent if spec.source else None
    reward = RewardModel.from_spec(spec.rollout, base_dir=base_dir)
    path = spec.rollout.dynamic_sampling_filter_path
    keep = load_filter(path, base_dir) if path else None
    num_rollout = num_rollouts(spec, len(dataset))
    announced = rundir.wait_for_engines(task.run_dir, task.num_engines, task.launch_id, deadline_s=engine_deadline_s())
    router = driver_router(spec, task)  # first: a router that is not installed is the user's to fix
    custom = CustomGeneration.from_spec(spec, tokenizer)
    engines = EngineFleet(FleetConfig.from_spec(spec, task), task, announced, custom=custom, router=router)
    buffer = None
    if spec.rollout.partial_rollout:
        buffer = PartialBuffer(decode=lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True)))
    driver = Driver(dataset=dataset, engines=engines, reward=reward, eval_data=eval_data, keep=keep, partial=buffer)
    return driver, num_rollout
