"""The backend-neutral actor: what the loop calls, whatever trains the model.

Two backends implement :class:`Actor`: FSDP2 (``miles.train.fsdp``, data
parallel only) and Megatron-core (``miles.train.megatron``, TP/PP/CP/EP). The
loop drives either one the same way, on every trainer rank at once (every call
is collective over the trainer ranks)::

    batch = RolloutBatch.from_samples(samples)          # identical on every trainer rank
    batch.old_logprobs = actor.compute_logprobs(batch)   # skipped when on-policy (one step per rollout)
    if needs_ref: batch.ref_logprobs = actor.compute_logprobs(batch, model="ref")
    batch.advantages = compute_advantages(spec.grpo, batch, ...)   # miles.algo
    step_metrics = actor.train(batch, rollout_id)         # num_steps_per_rollout optimizer steps
    for name, tensor in actor.named_hf_weights(): ...     # weight sync (tensors on trainer rank 0)

Every rank holds the whole rollout; each backend takes its own data-parallel
shard (``miles.train.batch.shard_steps``) because only it knows its mesh (a
Megatron DP rank is not its global rank). Results that the loop needs
(log-probs, metrics) come back complete and identical on every trainer rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import torch

from miles.errors import UserError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from miles.spec.tables import GrpoConfig, Spec
    from miles.train.batch import RolloutBatch


@dataclass(frozen=True)
class TrainerContext:
    """What a trainer rank knows about its process beyond the spec.

    The launcher fills it after ``torch.distributed.init_process_group``; the
    actor builds its mesh from ``group`` (all trainer ranks, excluding engines).
    """

    model_dir: str
    """Resolved HF model directory (``[model] hf_checkpoint``, or the built-in model written into the run dir)."""

    num_rollout: int
    """Resolved number of rollouts of the run; with ``num_steps_per_rollout`` it sets the LR decay length."""

    device: torch.device
    """``cuda:<local_rank>`` on GPUs, ``cpu`` with gloo."""

    group: ProcessGroup | None = None
    """Process group of the trainer ranks; ``None`` means the default (world) group."""


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

    def update_ref(self) -> None:
        """Copy the current actor weights into the reference (``ref_update_interval``)."""
        ...

    def save(self, path: str) -> None:
        """Write the whole training state (weights, optimizer, LR schedule, step counter, reference) to ``path``.

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


def build_actor(spec: Spec, ctx: TrainerContext) -> Actor:
    """Build the actor that ``[perf] backend`` selects."""
    backend = spec.perf.backend
    if backend == "fsdp":
        from miles.train.fsdp import FSDPActor

        return FSDPActor(spec, ctx)
    if backend == "megatron":
        from miles.train.megatron import build_megatron_actor  # type: ignore[attr-defined]

        actor: Actor = build_megatron_actor(spec, ctx)
        return actor
    raise UserError(f"[perf] backend = {backend!r} is not a training backend; use \"fsdp\" or \"megatron\"")


def needs_reference(grpo: GrpoConfig) -> bool:
    """Whether the run needs the frozen reference's log-probs (KL loss or KL-in-reward)."""
    return grpo.use_kl_loss or grpo.kl_coef > 0
