"""RNG capture/restore round trips and the resume compatibility rule."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from miles.ckpt.state import binding_fields, capture_rng, check_resumable, restore_rng
from miles.errors import UserError
from miles.spec.tables import CkptConfig, RolloutConfig, RunConfig, Spec


def _draw() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_round_trip_through_json() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()
    state = json.loads(json.dumps(capture_rng()))
    expected = [_draw() for _ in range(3)]
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng(state)
    assert [_draw() for _ in range(3)] == expected


def test_harmless_changes_resume() -> None:
    spec = Spec(rollout=RolloutConfig(rollout_batch_size=8, n_samples_per_prompt=4))
    saved = json.loads(json.dumps(binding_fields(spec)))
    changed = replace(
        spec,
        run=replace(spec.run, num_rollout=500, use_tensorboard=False),
        ckpt=CkptConfig(save_interval=3, keep_last=5),
    )
    check_resumable(saved, changed, "ckpt/rollout-000004")


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [("rollout", "rollout_batch_size", 16), ("run", "seed", 7), ("rollout", "n_samples_per_prompt", 2)],
)
def test_binding_changes_are_refused_with_the_key_and_values(table: str, key: str, value: object) -> None:
    spec = Spec(run=RunConfig(seed=1), rollout=RolloutConfig(rollout_batch_size=8, n_samples_per_prompt=4))
    saved = binding_fields(spec)
    changed = replace(spec, **{table: replace(getattr(spec, table), **{key: value})})
    with pytest.raises(UserError) as e:
        check_resumable(saved, changed, "ckpt/rollout-000004")
    msg = str(e.value)
    assert f"{table}.{key}" in msg and repr(value) in msg and "ckpt/rollout-000004" in msg
