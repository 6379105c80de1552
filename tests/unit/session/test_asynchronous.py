"""One-step-off async training's bookkeeping: staleness figures and the rollout ahead as checkpointed JSON."""

from __future__ import annotations

import json

from miles.sample import Sample
from miles.session.asynchronous import Generated, staleness


def _sample(version: int, **kw: object) -> Sample:
    return Sample(0, 7, [{"role": "user", "content": "1+1="}], "1+1=", [4, 5], weight_version=version, **kw)  # type: ignore[arg-type]


def test_staleness_counts_versions_between_the_generating_weights_and_the_trained_actor() -> None:
    samples = [_sample(3), _sample(3), _sample(4), _sample(4)]
    assert staleness(samples, trained_version=4) == {
        "rollout/staleness_mean": 0.5,
        "rollout/staleness_max": 1.0,
        "rollout/offpolicy_frac": 0.5,
    }


def test_the_rollout_ahead_survives_the_checkpoint_file_exactly() -> None:
    s = _sample(2, response_ids=[9, 10], response_logprobs=[-0.1234567890123, -2.5], reward=1.0, label="2")
    s.metadata = {"k": [1, 2]}
    ahead = Generated([s], {"rollout/groups_kept": 1.0}, engine_seconds=3.0)
    back = Generated.from_json(json.loads(json.dumps(ahead.to_json())))
    assert back.samples == [s] and back.scored_stats == {"rollout/groups_kept": 1.0}
