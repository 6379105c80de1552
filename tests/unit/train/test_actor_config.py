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
