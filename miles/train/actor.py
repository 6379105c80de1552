"""The backend-neutral actor: what the loop calls, whatever trains the model.

Two backends implement :class:`Actor`: FSDP2 (``miles.train.fsdp``, data
parallel only) and Megatron-core (``miles.train.megatron``, TP/PP/CP/EP). The
loop drives either one the same way, on every trainer rank at once (every call
is collective over the trainer ranks)::

    batch = prepare_batch(actor, samples, cfg)            # below: tensors, old/ref log-probs, advantages
    step_metrics = actor.train(batch, rollout_id)         # num_steps_per_rollout optimizer steps
    for name, tensor in actor.named_hf_weights(): ...     # weight sync (tensors on trainer rank 0)
    actor.save(ckpt_dir); actor.load(ckpt_dir)            # DCP checkpoint of the training state
    actor.update_ref()                                    # every ref_update_interval rollouts, if set
    actor.offload(); ...; actor.onload()                  # colocated GPUs: around generation

Both backends and :func:`prepare_batch` read the spec only through
:class:`ActorConfig`, built once from it where the actor is built; the
layout they train on is the planner's (:attr:`TrainerContext.mesh`).

Every rank holds the whole rollout; each backend takes its own data-parallel
shard (``miles.train.batch.shard``) because only it knows its mesh (a
Megatron DP rank is not its global rank). Results that the loop needs
(log-probs, metrics) come back complete and identical on every trainer rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import torch

from miles.algo.advantages import AdvantageInputs, compute_advantages
from miles.algo.loss import Aggregation, LossConfig, aggregation_for
from miles.ckpt.reference import refuse_megatron_reference
from miles.errors import UserError
from miles.train.batch import RolloutBatch

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from miles.plan.model import TrainerMesh
    from miles.sample import Sample
    from miles.spec.tables import GrpoConfig, OptimizerConfig, PerfConfig, Spec, TrainConfig


@dataclass(frozen=True)
class TrainerContext:
    """What a trainer rank knows about its process beyond the spec.

    The launcher fills it after ``torch.distributed.init_process_group``: FSDP
    shards over ``group`` (all trainer ranks, excluding engines), Megatron builds
    its process groups from the planner's ``mesh``.
    """

    model_dir: str
    """Resolved HF model directory (``[model] hf_checkpoint``, or the built-in model written into the run dir)."""

    num_rollout: int
    """Resolved number of rollouts of the run; with ``num_steps_per_rollout`` it sets the LR decay length."""

    device: torch.device
    """``cuda:<local_rank>`` on GPUs, ``cpu`` with gloo."""

    group: ProcessGroup | None = None
    """Process group of the trainer ranks; ``None`` means the default (world) group."""

    mesh: TrainerMesh | None = None
    """The planner's trainer mesh (:func:`miles.plan.trainer_mesh`); the Megatron backend needs it, FSDP is pure DP."""


@dataclass(frozen=True)
class ActorConfig:
    """What a training actor and :func:`prepare_batch` read of the spec, built once (:meth:`from_spec`)."""

    backend: str
    """``[perf] backend``: which :class:`Actor` trains (``miles.train.backends``)."""
    train: TrainConfig
    """``[train]``, with ``global_batch_size`` and ``num_steps_per_rollout`` resolved."""
    optimizer: OptimizerConfig
    grpo: GrpoConfig
    """Advantages, KL in the reward and reference updates; the loss reads :attr:`loss` and :attr:`aggregation`."""
    loss: LossConfig
    aggregation: Aggregation
    dtype: str
    """``[model] dtype``: the compute dtype."""
    trust_remote_code: bool
    temperature: float
    """The sampling temperature the log-probs are computed at (``rollout_temperature``, 1 for greedy)."""
    max_response_len: int
    """``rollout_max_response_len``, the denominator of ``sample_token_sum`` aggregation."""
    ref_load: str
    """``[ckpt] ref_load``: the reference's HF directory, empty for the initial model (:func:`reference_dir`)."""
    save_optim: bool
    """The optimizer's state goes into checkpoints (not ``[ckpt] no_save_optim``)."""
    perf: PerfConfig
    """The Megatron backend's model and kernel knobs; its layout is the planner's mesh, never read from here."""
    seed: int
    """``[run] seed``: Megatron's model-parallel RNG."""

    @classmethod
    def from_spec(cls, spec: Spec) -> ActorConfig:
        t = spec.train
        if t.global_batch_size is None or t.num_steps_per_rollout is None:
            raise UserError(
                "[train] global_batch_size and num_steps_per_rollout must be resolved before building the actor"
            )
        temperature = spec.rollout.rollout_temperature
        return cls(
            backend=spec.perf.backend,
            train=t,
            optimizer=spec.optimizer,
            grpo=spec.grpo,
            loss=LossConfig.from_grpo(spec.grpo),
            aggregation=aggregation_for(spec.grpo),
            dtype=spec.model.dtype,
            trust_remote_code=spec.model.trust_remote_code,
            temperature=temperature if temperature > 0 else 1.0,
            max_response_len=spec.rollout.rollout_max_response_len,
            ref_load=spec.ckpt.ref_load,
            save_optim=not spec.ckpt.no_save_optim,
            perf=spec.perf,
            seed=spec.run.seed,
        )

    @property
    def steps_per_rollout(self) -> int:
        assert self.train.num_steps_per_rollout is not None  # resolved in from_spec
        return self.train.num_steps_per_rollout


StepMetrics = dict[str, float]
"""Scalar metrics of one optimizer step (loss, pg_loss, kl_loss, entropy, clip_frac, grad_norm, lr, ...)."""


@runtime_checkable
class Actor(Protocol):
    """The model being trained, its reference copy and its optimizer, behind one small surface.

    Every method is collective over the trainer ranks: call it on all of them
    with the same arguments.
    """

    def compute_logprobs(self, batch: RolloutBatch, *, model: Literal["actor", "ref"] = "actor") -> list[torch.Tensor]:
        """Log-probabilities of every response token, no grad, fp32.

        Returns one 1-D CPU float32 tensor of length ``len(sample.response_ids)``
        per sample, in batch order, identical on every trainer rank. ``model="ref"``
        uses the frozen reference.
        """
        ...

    def train(self, batch: RolloutBatch, rollout_id: int) -> list[StepMetrics]:
        """Run ``num_steps_per_rollout`` optimizer steps over the rollout.

        ``batch.advantages`` must be set; ``batch.old_logprobs`` may be ``None``
        only with one step per rollout (the policy is then its own old policy:
        the ratio is computed against the detached current log-probs). Returns
        one metrics dict per optimizer step, reduced over the DP ranks and
        identical on every rank.
        """
        ...

    def named_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, full_tensor)`` for every parameter and persistent buffer, in a fixed order.

        Collective: every trainer rank must iterate it to the end. The tensors
        are complete only on trainer rank 0 (the sync source); other ranks
        receive the same names with tensors they must not use. Names and dtypes
        are those of the HF checkpoint (``model.safetensors``).
        """
        ...

    def save_hf(self, out_dir: str) -> None:
        """Write the current weights as an HF model directory (``model.safetensors`` + config/tokenizer files).

        Collective; trainer rank 0 writes (see :func:`miles.train.hf_checkpoint.save_hf_checkpoint`).
        """
        ...

    def update_ref(self) -> None:
        """Copy the current actor weights into the reference (``ref_update_interval``)."""
        ...

    def offload(self) -> None:
        """Move weights and optimizer state off the accelerator while colocated engines generate (``offload_train``).

        A no-op on CPU. After :meth:`onload` training continues exactly as if nothing had moved.
        """
        ...

    def onload(self) -> None:
        """Bring back what :meth:`offload` moved; call before the next :meth:`train` or :meth:`compute_logprobs`."""
        ...

    def save(self, path: str) -> None:
        """Write the training state (weights, optimizer, step counter, a reference that ``ref_update_interval`` moved)
        to ``path``.

        Uses ``torch.distributed.checkpoint`` (sharded: every rank writes its
        part). ``path`` is a directory the caller created; the caller makes
        the save atomic (temporary name, rename, completion marker).
        """
        ...

    def load(self, path: str) -> None:
        """Restore what :meth:`save` wrote; the next :meth:`train` is then bit-identical to an uninterrupted run."""
        ...

    @property
    def step(self) -> int:
        """Optimizer steps taken so far (the LR schedule's position)."""
        ...


def prepare_batch(actor: Actor, samples: Sequence[Sample], cfg: ActorConfig) -> RolloutBatch:
    """Scored samples -> a :class:`RolloutBatch` ready for :meth:`Actor.train` (collective).

    Computes only what the run needs: the old log-probs when the policy moves
    within the rollout (more than one optimizer step) or the reward carries a
    KL penalty; the reference log-probs for a KL loss or KL reward; then the
    advantages of ``[grpo] advantage_estimator``. With one step per rollout the
    old log-probs are left ``None``: the loss then uses the detached current
    log-probs, saving one forward pass per rollout. ``[grpo] use_rollout_logprobs``
    takes the engine's log-probs as the old ones instead (no forward pass).
    """

    batch = RolloutBatch.from_samples(samples)
    grpo = cfg.grpo
    if grpo.use_rollout_logprobs:  # the policy that generated the rollout is the old one (one update behind, async)
        if batch.rollout_logprobs is None:
            raise ValueError("[grpo] use_rollout_logprobs needs the engine's log-probs in every sample")
        batch.old_logprobs = [lp.clone() for lp in batch.rollout_logprobs]
    elif cfg.steps_per_rollout > 1 or grpo.kl_coef > 0:
        batch.old_logprobs = actor.compute_logprobs(batch)
    if needs_reference(grpo):
        batch.ref_logprobs = actor.compute_logprobs(batch, model="ref")
    batch.advantages = compute_advantages(
        grpo,
        AdvantageInputs(
            rewards=batch.rewards,
            group_index=batch.group_index,
            loss_masks=batch.loss_masks,
            old_logprobs=batch.old_logprobs,
            ref_logprobs=batch.ref_logprobs,
        ),
    )
    return batch


def needs_reference(grpo: GrpoConfig) -> bool:
    """Whether the run needs the frozen reference's log-probs (KL loss or KL-in-reward)."""
    return grpo.use_kl_loss or grpo.kl_coef > 0


def reference_dir(ref_load: str, model_dir: str) -> str:
    """The HF directory the frozen reference is built from: ``[ckpt] ref_load``, else the initial model.

    A Megatron checkpoint there is refused (the pre-flight does so too, but only for paths it can see).
    """
    if not ref_load:
        return model_dir
    why = refuse_megatron_reference(ref_load)
    if why:
        raise UserError(f"[ckpt] ref_load: {why}")
    return ref_load


def ref_update_due(grpo: GrpoConfig, rollout_id: int) -> bool:
    """Whether ``[grpo] ref_update_interval`` copies the actor into the reference after ``rollout_id``."""
    interval = grpo.ref_update_interval
    return interval is not None and (rollout_id + 1) % interval == 0
