"""Everything one trainer rank holds during a run, and the phases the loop calls.

``miles.loop.run_trainer`` is the loop; this class is what its lines mean. The
driver (trainer rank 0) additionally owns the dataset, the engine client, the
reward and the metrics; other ranks hold ``None`` there and receive the rollout
from the driver.

Exact resume rests on three facts kept here: every random choice is a pure
function of seeds and the rollout id (prompt order, sampling seeds), the
checkpoint taken before rollout ``k`` holds the state *as of the start* of
rollout ``k`` (so a save in the middle of a rollout redoes it from the start),
and the engines are given the actor's exact weights right after a resume.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from miles import fault
from miles.ckpt.state import binding_fields, capture_rng, check_resumable, restore_rng
from miles.ckpt.store import CheckpointStore, write_json_atomic
from miles.launch.environment import TaskContext
from miles.metrics import MetricsLog, console_line
from miles.model.builtin import materialize
from miles.sample import Sample
from miles.spec.tables import Spec
from miles.train.actor import Actor, StepMetrics, TrainerContext, build_actor, prepare_batch
from miles.train.batch import RolloutBatch

log = logging.getLogger("miles.loop")


def resolve_model_dir(spec: Spec, run_dir: Path) -> str:
    """The HF directory both the actor and the engines load: the checkpoint, or the built-in written once."""
    if spec.model.builtin:
        return str(materialize(spec.model.builtin, run_dir / "model", seed=spec.run.seed, dtype=spec.model.dtype))
    return spec.model.hf_checkpoint


def control_dir(run_dir: Path) -> Path:
    """Flag files shared by the batch shell, the launcher and the ranks (``preempt``, ``done``)."""
    return run_dir / "control"


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class _RolloutStart:
    """State captured when a rollout begins, saved if the run stops before the rollout trains."""

    dataset: dict[str, Any] | None
    rng: dict[str, Any]


@dataclass
class _Timer:
    phases: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.phases[f"time/{name}"] = self.phases.get(f"time/{name}", 0.0) + now - since
        return now


class Session:
    """One trainer rank's view of a run; build it with :meth:`start`."""

    def __init__(self, spec: Spec, task: TaskContext, actor: Actor, num_rollout: int, model_dir: str) -> None:
        self.spec = spec
        self.model_dir = model_dir
        self.task = task
        self.actor = actor
        self.num_rollout = num_rollout
        self.rank = dist.get_rank()
        self.is_driver = self.rank == 0
        self.run_dir = Path(task.run_dir)
        self.store = CheckpointStore(Path(spec.ckpt.save or self.run_dir / "checkpoints"), spec.ckpt.keep_last)
        self.start_rollout = 0
        self.weight_version = 0
        self.timer = _Timer()
        self._rollout_start: _RolloutStart | None = None
        self._t = time.perf_counter()
        self._gen_tokens = 0
        self._gen_seconds = 0.0
        self._saved_at: int | None = None
        self._in_progress: int | None = None
        self._samples: list[Sample] = []
        # Colocated on GPUs, the actor and the engines take turns with the memory (Miles' --offload-*).
        colocated_gpu = spec.cluster.mode == "colocate" and task.device == "cuda"
        self.offload_train = colocated_gpu if spec.perf.offload_train is None else spec.perf.offload_train
        self.offload_rollout = colocated_gpu if spec.perf.offload_rollout is None else spec.perf.offload_rollout
        # Colocated tensor sync: every trainer rank shares its copy of each bucket with the engine on its GPU.
        from miles.session_driver import local_device, trainer_group, weight_sync_kind

        self.sync_peer: Any = None
        if not self.is_driver and weight_sync_kind(spec, task.device) == "tensor" and trainer_group() is not None:
            from miles.transfer.colocate import TensorSyncPeer

            self.sync_peer = TensorSyncPeer(spec.rollout.update_weight_buffer_size, local_device(task), trainer_group())
        # Driver-only components.
        self.dataset: Any = None
        self.engines: Any = None
        self.reward: Any = None
        self.metrics: MetricsLog | None = None

    # ------------------------------------------------------------------ start-up

    @classmethod
    def start(cls, spec: Spec, task: TaskContext) -> Session:
        """Build the actor and the driver's components, then resume from the newest complete checkpoint."""
        _install_stop_handlers(control_dir(Path(task.run_dir)))
        torch.manual_seed(spec.run.seed)
        run_dir = Path(task.run_dir)
        if dist.get_rank() == 0:
            model_dir = resolve_model_dir(spec, run_dir)
        model_dir = _broadcast(model_dir if dist.get_rank() == 0 else None)

        from miles.session_driver import build_driver  # torch-free parts of the driver live there

        driver = build_driver(spec, task, model_dir) if dist.get_rank() == 0 else None
        num_rollout = _broadcast(driver.num_rollout if driver is not None else None)
        device = torch.device(f"cuda:{task.local_rank}" if task.device == "cuda" else "cpu")
        actor = build_actor(spec, TrainerContext(model_dir=model_dir, num_rollout=num_rollout, device=device))
        run = cls(spec, task, actor, num_rollout, model_dir)
        if driver is not None:
            run.dataset, run.engines, run.reward = driver.dataset, driver.engines, driver.reward
        run._resume()
        if run.is_driver:
            run.metrics = MetricsLog(run_dir, run.start_rollout, spec.run.use_tensorboard, spec.run.plot)
        return run

    def _resume(self) -> None:
        """Load the newest complete checkpoint (if any) and give the engines the actor's weights."""
        found = None
        if self.is_driver:
            load_root = Path(self.spec.ckpt.load) if self.spec.ckpt.load else self.store.root
            found = CheckpointStore(load_root, self.spec.ckpt.keep_last).newest_valid()
        found = _broadcast(None if found is None else (found[0], str(found[1])))
        if found is None:
            return
        rollout_id, path = found[0], Path(found[1])
        driver_state = json.loads((path / "driver.json").read_text())
        check_resumable(driver_state["spec"], self.spec, str(path))
        self.actor.load(str(path / "actor"))
        rng_file = path / "rng" / f"rank-{self.rank}.json"
        if rng_file.exists():
            restore_rng(json.loads(rng_file.read_text()))
        self.start_rollout = rollout_id
        self._saved_at = rollout_id
        self.weight_version = driver_state["weight_version"]
        if self.is_driver:
            self.dataset.load_state_dict(driver_state["dataset"])
            print(f"miles: resumed from {path} at rollout {rollout_id}", flush=True)
        self.sync_weights(bump=False)

    # ------------------------------------------------------------------ phases

    def begin_rollout(self, rollout_id: int) -> None:
        """Remember the state a save before this rollout's training must restore."""
        self._rollout_start = _RolloutStart(
            dataset=self.dataset.state_dict() if self.is_driver else None, rng=capture_rng()
        )
        self._in_progress = rollout_id
        self.timer = _Timer()
        self._t = time.perf_counter()
        self._rollout_t0 = self._t

    def generate(self, rollout_id: int) -> list[Sample] | None:
        """Driver: draw ``rollout_batch_size`` prompts and have the engines answer each ``n`` times."""
        from miles.data import expand_groups

        if self.offload_train:
            self.actor.offload()  # every rank: the engines on these GPUs need the memory now
        if not self.is_driver:
            return None
        prompts = self.dataset.sample(self.spec.rollout.rollout_batch_size)
        samples = expand_groups(prompts, self.spec.rollout.n_samples_per_prompt)
        t0 = time.perf_counter()
        self.engines.generate(samples, rollout_id=rollout_id, weight_version=self.weight_version)
        self._gen_seconds = time.perf_counter() - t0
        self._gen_tokens = sum(len(s.response_ids) for s in samples)
        if self.offload_rollout:
            self.engines.release_memory()
        self._t = self.timer.add("generate", self._t)
        fault.point("generate", rollout_id, self.run_dir, self.rank)
        return samples

    def score(self, samples: list[Sample] | None) -> dict[str, float]:
        """Driver: rewards for every sample; then every rank receives the scored rollout."""
        stats: dict[str, float] = {}
        if self.offload_train:
            self.actor.onload()  # the engines released their memory after generating
        if self.is_driver:
            assert samples is not None
            stats = self.reward.score_blocking(samples).metrics()
        self._t = self.timer.add("reward", self._t)
        self._samples = _broadcast(samples if self.is_driver else None)
        return stats

    def prepare_batch(self) -> RolloutBatch:
        """Tensors of the scored rollout, with the log-probs the spec needs and the advantages."""
        batch = prepare_batch(self.actor, self._samples, self.spec)
        self._t = self.timer.add("logprobs", self._t)
        return batch

    def train(self, batch: RolloutBatch, rollout_id: int) -> list[StepMetrics]:
        """``num_steps_per_rollout`` optimizer steps of the actor over this rollout."""
        fault.point("train", rollout_id, self.run_dir, self.rank)
        metrics = self.actor.train(batch, rollout_id)
        interval = self.spec.grpo.ref_update_interval
        if interval is not None and (rollout_id + 1) % interval == 0:
            self.actor.update_ref()
        return metrics

    def sync_weights(self, bump: bool = True) -> None:
        """Give the engines the actor's current weights (collective over the trainer ranks)."""
        t0 = time.perf_counter()
        if bump:
            self._t = self.timer.add("train", self._t)
            self.weight_version += 1
        weights = self.actor.named_hf_weights()
        if self.is_driver:
            if self.offload_rollout and bump:
                self.engines.resume_memory()
            if self.spec.rollout.check_weight_sync:
                weights, sent = _with_checksums(weights)
                self.engines.sync(weights, version=self.weight_version)
                _check_engine_weights(self.engines, sent)
            else:
                self.engines.sync(weights, version=self.weight_version)
        elif self.sync_peer is not None:
            self.sync_peer.sync(weights)  # in step with the driver's TensorSync (collective)
        else:
            for _ in weights:  # collective: every rank walks the iterator to the end
                pass
        if bump:
            self._t = self.timer.add("sync", t0)
            fault.point("sync", self.weight_version - 1, self.run_dir, self.rank)

    def stop_requested(self) -> bool:
        """Whether any rank saw the preempt flag; agreed by all-reduce at a phase boundary."""
        # On the collective's device: an NCCL world has no CPU backend.
        device = torch.device("cuda", torch.cuda.current_device()) if self.task.device == "cuda" else None
        flag = torch.tensor([1 if (control_dir(self.run_dir) / "preempt").exists() else 0], dtype=torch.int32,
                            device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def save_due(self, rollout_id: int) -> bool:
        interval = self.spec.ckpt.save_interval
        return interval is not None and (rollout_id + 1) % interval == 0

    # ------------------------------------------------------------------ saving

    def save(self, next_rollout: int) -> None:
        """Collective save of the whole RL state as the checkpoint before ``next_rollout``.

        When ``next_rollout`` is the rollout in progress (a stop before it trained), the
        data cursor and RNG states are those captured when it began, so a resume redoes it.
        """
        t0 = time.perf_counter()
        partial: Path | None = self.store.partial_dir(next_rollout) if self.is_driver else None
        partial = Path(_broadcast(str(partial) if partial else None))
        self.actor.save(str(partial / "actor"))
        start = self._rollout_start if self._in_progress == next_rollout else None
        (partial / "rng").mkdir(exist_ok=True)
        write_json_atomic(partial / "rng" / f"rank-{self.rank}.json", start.rng if start else capture_rng())
        dist.barrier()
        fault.point("save", next_rollout, self.run_dir, self.rank)
        if self.is_driver:
            dataset_state = start.dataset if start else self.dataset.state_dict()
            write_json_atomic(
                partial / "driver.json",
                {
                    "rollout_id": next_rollout,
                    "weight_version": self.weight_version,
                    "actor_step": self.actor.step,
                    "dataset": dataset_state,
                    "spec": binding_fields(self.spec),
                    "rollout_seed": self.spec.rollout.rollout_seed,
                },
            )
            final = self.store.commit(partial, next_rollout)
            log.info("saved %s in %.2fs", final, time.perf_counter() - t0)
        dist.barrier()
        if self.spec.ckpt.save_hf:
            self.export_hf(Path(self.spec.ckpt.save_hf.replace("{rollout_id}", str(next_rollout))))
        self._saved_at = next_rollout

    def save_and_exit(self, next_rollout: int) -> int:
        """Save because the job is preempted or cancelled, then end this rank cleanly (the batch shell decides)."""
        self.save(next_rollout)
        if self.is_driver:
            print(f"miles: preempted; saved the state before rollout {next_rollout}; exiting (the job requeues "
                  "unless it was cancelled)", flush=True)
        self._close()
        return 0

    def log(self, rollout_id: int, reward_stats: dict[str, float], step_metrics: list[StepMetrics]) -> None:
        """Driver: write this rollout's metrics (deterministic) and perf figures (wall clock)."""
        self._in_progress = None
        if not self.is_driver:
            return
        assert self.metrics is not None
        s: list[Sample] = self._samples
        rewards = [x.reward for x in s]
        lens = [len(x.response_ids) for x in s]
        metrics: dict[str, float] = {
            "rollout/samples": float(len(s)),
            "rollout/reward_mean": statistics.fmean(rewards),
            "rollout/reward_std": statistics.pstdev(rewards),
            "rollout/response_len_mean": statistics.fmean(lens),
            "rollout/truncated_frac": statistics.fmean(1.0 if x.finish_reason == "length" else 0.0 for x in s),
            "rollout/weight_version": float(self.weight_version),
        }
        metrics.update({k: float(v) for k, v in reward_stats.items()})
        keys = sorted({k for m in step_metrics for k in m})
        for k in keys:
            metrics[f"train/{k}"] = statistics.fmean(m[k] for m in step_metrics if k in m)
        # Wall-clock figures differ between any two runs: they go to perf.jsonl, never metrics.jsonl.
        perf = {k: metrics.pop(k) for k in [k for k in metrics if k.endswith("time_s")]}
        perf.update(self.timer.phases)
        perf["time/total"] = time.perf_counter() - self._rollout_t0
        perf["rollout/tokens_per_s"] = self._gen_tokens / self._gen_seconds if self._gen_seconds > 0 else 0.0
        self.metrics.log(rollout_id, metrics, perf)
        print(console_line(rollout_id, self.num_rollout, metrics, perf), flush=True)

    def export_hf(self, out: Path) -> None:
        """Write the actor's weights as an HF directory, atomically (collective)."""
        tmp = out.with_name(f".{out.name}.partial")
        if self.is_driver:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        self.actor.save_hf(str(tmp))
        if self.is_driver:
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        dist.barrier()

    def finish(self) -> int:
        """The run is complete: final save and HF export, mark done (no requeue), close."""
        if self._saved_at != self.num_rollout:
            self.save(self.num_rollout)
        self.export_hf(self.run_dir / "final")
        if self.is_driver:
            control_dir(self.run_dir).mkdir(parents=True, exist_ok=True)
            (control_dir(self.run_dir) / "done").write_text(json.dumps({"num_rollout": self.num_rollout}))
            print(f"miles: run complete ({self.num_rollout} rollouts); see {self.run_dir}", flush=True)
        self._close()
        return 0

    def _close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.engines is not None:
            self.engines.close()
        if self.reward is not None:
            self.reward.close()


def _with_checksums(weights: Any) -> tuple[Any, dict[str, str]]:
    """Pass the weights through unchanged while recording SGLang-style checksums of each tensor."""
    from miles.rollout.engine import tensor_checksum

    sent: dict[str, str] = {}

    def gen() -> Any:
        for name, t in weights:
            sent[name] = tensor_checksum(t)
            yield name, t

    return gen(), sent


def _check_engine_weights(engines: Any, sent: dict[str, str]) -> None:
    """``[rollout] check_weight_sync``: every engine must now hold exactly the actor's weights."""
    from miles.rollout import sglang_protocol as proto

    answers = engines.client.call_all(proto.WEIGHTS_CHECKER.path, proto.weights_checker_body())
    for url, answer in zip(engines.urls, answers, strict=True):
        held = answer["ranks"][0]["checksums"]
        wrong = sorted(n for n in sent if held.get(n) != sent[n])
        if wrong:
            raise RuntimeError(f"weight sync check failed: engine {url} differs from the actor in {len(wrong)} "
                               f"tensors, e.g. {wrong[:3]}")
    print(f"miles: weight sync verified: {len(sent)} tensors bit-equal on {len(answers)} engines", flush=True)


def _install_stop_handlers(control: Path) -> None:
    """SIGTERM/SIGINT only touch the preempt flag: the ranks act on it at the next boundary."""

    def handler(signum: int, frame: FrameType | None) -> None:
        control.mkdir(parents=True, exist_ok=True)
        flag = control / "preempt"
        if signum == signal.SIGINT and flag.exists():
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        flag.touch()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    os.environ.setdefault("MILES_STOP_FLAG", str(control / "preempt"))
