"""ActorConfig: what the actors and prepare_batch read of the spec, built once."""

from __future__ import annotations

import pytest

from miles.algo.loss import LossConfig
from miles.errors import UserError
from miles.spec.tables import CkptConfig, GrpoConfig, PerfConfig, RolloutConfig, RunConfig, Spec, TrainConfig
from miles.train.actor import ActorConfig

RESOLVED = TrainConfig(global_batch_size=8, num_steps_per_rollout=2)


def test_unresolved_batch_knobs_are_refused() -> None:
    with pytest.raises(UserError, match="global_batch_size and num_steps_per_rollout must be resolved"):
        ActorConfig.from_spec(Spec(train=TrainConfig(global_batch_size=8)))


def test_fields_are_the_specs_resolved_once() -> None:
    grpo = GrpoConfig(advantage_estimator="gspo", use_kl_loss=True, kl_loss_coef=0.01)
    spec = Spec(
        train=RESOLVED,
        grpo=grpo,
        rollout=RolloutConfig(rollout_temperature=0.0, rollout_max_response_len=64),
        ckpt=CkptConfig(ref_load="/ref", no_save_optim=True),
        perf=PerfConfig(backend="megatron", tp=2),
        run=RunConfig(seed=7),
    )
    cfg = ActorConfig.from_spec(spec)
    assert cfg.backend == "megatron" and cfg.train is RESOLVED and cfg.steps_per_rollout == 2
    assert cfg.loss == LossConfig.from_grpo(grpo) and cfg.loss.sequence_ratio
    assert cfg.temperature == 1.0  # greedy sampling: log-probs at temperature 1
    assert (cfg.max_response_len, cfg.ref_load, cfg.save_optim, cfg.seed) == (64, "/ref", False, 7)
    assert (
        ActorConfig.from_spec(Spec(train=RESOLVED, rollout=RolloutConfig(rollout_temperature=0.7))).temperature == 0.7
    )


def _one_step_off_samples() -> list:
    from miles.sample import Sample

    return [
        Sample(
            group_index=i // 2,
            prompt_index=i // 2,
            prompt="p",
            prompt_text="p",
            prompt_ids=[1, 2],
            response_ids=[3],
            response_logprobs=[-2.0],  # the engine's: the generating weights, one update behind the actor (async)
            reward=float(i % 2),
        )
        for i in range(4)
    ]


class _Actor:
    """The actor's own log-prob of every response token: -1.0 (it moved since the engine generated)."""

    def __init__(self) -> None:
        self.forwards = 0

    def compute_logprobs(self, batch, *, model="actor"):  # type: ignore[no-untyped-def]
        import torch

        self.forwards += 1
        return [torch.full((n,), -1.0) for n in batch.response_lens]


def test_use_rollout_logprobs_makes_the_engines_logprobs_the_old_policy() -> None:
    """One step off (``train_async``), the rollout comes from the weights before the last update: with
    ``use_rollout_logprobs`` the PPO ratio is against them, so the clip bites where the actor already moved."""
    import torch

    from miles.algo.loss import LossInputs, policy_loss
    from miles.train.actor import prepare_batch

    spec = Spec(train=TrainConfig(global_batch_size=4, num_steps_per_rollout=1))
    actor = _Actor()
    default = prepare_batch(actor, _one_step_off_samples(), ActorConfig.from_spec(spec))  # type: ignore[arg-type]
    assert default.old_logprobs is None  # one step: the detached current log-probs, ratio 1
    on = Spec(train=spec.train, grpo=GrpoConfig(use_rollout_logprobs=True))
    batch = prepare_batch(actor, _one_step_off_samples(), ActorConfig.from_spec(on))  # type: ignore[arg-type]
    assert actor.forwards == 0  # no forward pass for the old log-probs
    assert batch.old_logprobs is not None and [lp.tolist() for lp in batch.old_logprobs] == [[-2.0]] * 4

    # the actor's -1.0 against the engine's -2.0: ratio e > 1.28, so positive advantages are clipped (no gradient)
    lp = torch.full((4, 1), -1.0, requires_grad=True)
    inputs = LossInputs(
        logprobs=lp,
        advantages=torch.tensor([[1.0], [1.0], [1.0], [1.0]]),
        mask=torch.ones(4, 1),
        weights=torch.full((4, 1), 0.25),
        old_logprobs=torch.stack(batch.old_logprobs),
    )
    loss, metrics = policy_loss(LossConfig.from_grpo(on.grpo), inputs)
    loss.backward()
    assert metrics["clip_frac"].item() == 1.0 and lp.grad is not None and lp.grad.abs().sum().item() == 0.0


def test_use_rollout_logprobs_needs_the_engines_logprobs() -> None:
    from miles.train.actor import prepare_batch

    samples = _one_step_off_samples()
    samples[0].response_logprobs = []
    on = Spec(
        train=TrainConfig(global_batch_size=4, num_steps_per_rollout=1), grpo=GrpoConfig(use_rollout_logprobs=True)
    )
    with pytest.raises(ValueError, match="use_rollout_logprobs needs the engine's log-probs"):
        prepare_batch(_Actor(), samples, ActorConfig.from_spec(on))  # type: ignore[arg-type]
