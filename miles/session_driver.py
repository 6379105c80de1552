"""The driver's half of a session: data, engines, reward (trainer rank 0 only).

The driver is the one trainer rank that talks to the outside world: it reads the
prompt data, waits for the engines to announce themselves, sends them the
prompts, scores the responses and pushes the actor's weights to them. Keeping
these here leaves :mod:`miles.session` about the collective parts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miles.errors import UserError
from miles.launch import rundir
from miles.launch.environment import TaskContext
from miles.sample import Sample
from miles.spec.tables import Spec


class EngineFleet:
    """The driver's handle on every engine: generation through the client, weights through the sync group."""

    def __init__(self, spec: Spec, task: TaskContext, urls: list[str]) -> None:
        from miles.rollout.client import BlockingRolloutClient
        from miles.transfer.sync import WeightSync

        self.spec = spec
        self.urls = urls
        self.api_key = os.environ.get("MILES_ENGINE_API_KEY") or None
        self.client = BlockingRolloutClient(urls, api_key=self.api_key)
        self.sync_group = WeightSync(
            urls,
            master_address=task.weight_update_addr,
            master_port=task.weight_update_port,
            backend=task.backend,
            bucket_bytes=spec.rollout.update_weight_buffer_size,
            api_key=self.api_key,
            device=f"cuda:{task.local_rank}" if task.device == "cuda" else "cpu",
        )
        self.sync_group.connect()

    def generate(self, samples: list[Sample], rollout_id: int, weight_version: int) -> None:
        """Fill every sample's response fields; each sample's seed is a pure function of its position."""
        self.client.generate(samples, self.spec.rollout, rollout_id)

    def release_memory(self) -> None:
        """Colocated GPUs: engines free their weights and KV cache while the actor trains."""
        from miles.rollout import sglang_protocol as proto

        self.client.call_all(proto.RELEASE_MEMORY_OCCUPATION.path, proto.release_memory_occupation_body())

    def resume_memory(self) -> None:
        from miles.rollout import sglang_protocol as proto

        self.client.call_all(proto.RESUME_MEMORY_OCCUPATION.path, proto.resume_memory_occupation_body())

    def sync(self, weights: Any, version: int) -> None:
        self.sync_group.sync(weights, weight_version=version)

    def close(self) -> None:
        self.sync_group.close()
        self.client.close()


@dataclass
class Driver:
    dataset: Any
    engines: EngineFleet
    reward: Any
    num_rollout: int


def build_driver(spec: Spec, task: TaskContext, model_dir: str) -> Driver:
    """Everything the driver owns, built once at start (the engines are waited for here)."""
    from transformers import AutoTokenizer

    from miles.data import PromptDataset
    from miles.reward.model import RewardModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=spec.model.trust_remote_code)
    dataset = PromptDataset.from_spec(spec.rollout, tokenizer)
    reward = RewardModel.from_spec(spec.rollout, base_dir=Path(spec.source).parent if spec.source else None)
    num_rollout = spec.run.num_rollout
    if num_rollout is None:
        assert spec.run.num_epoch is not None and spec.rollout.rollout_batch_size is not None
        num_rollout = spec.run.num_epoch * len(dataset) // spec.rollout.rollout_batch_size
        if num_rollout == 0:
            raise UserError(
                f"[run] num_epoch = {spec.run.num_epoch} over {len(dataset)} prompts gives no full rollout of "
                f"rollout_batch_size = {spec.rollout.rollout_batch_size}; raise num_epoch or set num_rollout"
            )
    announced = rundir.wait_for_engines(task.run_dir, task.num_engines, task.launch_id, deadline_s=900.0)
    engines = EngineFleet(spec, task, [a.url for a in announced])
    return Driver(dataset=dataset, engines=engines, reward=reward, num_rollout=num_rollout)
