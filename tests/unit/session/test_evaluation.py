"""Evaluation's schedule, seeds and figures (the loop's and ``miles eval``'s, see miles/session/evaluation.py)."""

from __future__ import annotations

import dataclasses

import pytest

from miles.sample import Sample
from miles.session.evaluation import EvalSettings, dataset_metrics, seed_namespace, table
from miles.spec.tables import EvalConfig, Spec


def _settings(**kw: object) -> EvalSettings:
    ev = dataclasses.replace(EvalConfig(eval_prompt_data={"a": "a.jsonl", "b": "b.jsonl"}, eval_interval=3), **kw)
    return EvalSettings.from_spec(Spec(eval=ev))


def test_due_before_training_every_interval_and_at_the_end() -> None:
    assert [s for s in range(11) if _settings().due(s, 10)] == [0, 3, 6, 9, 10]
    assert [s for s in range(11) if _settings(skip_eval_before_train=True).due(s, 10)] == [3, 6, 9, 10]
    assert not any(_settings(eval_interval=None).due(s, 10) for s in range(11))


def test_overrides_are_the_eval_keys_that_are_set() -> None:
    assert _settings().overrides == {}
    got = _settings(eval_temperature=0.0, eval_top_k=1, eval_max_response_len=8).overrides
    assert got == {"temperature": 0.0, "top_k": 1, "max_new_tokens": 8}


def test_eval_seeds_never_meet_a_training_rollout_and_differ_per_step_and_dataset() -> None:
    ids = {seed_namespace(step, d, 2) for step in range(50) for d in range(2)}
    assert len(ids) == 100 and max(ids) < 0


def _sample(group: int, reward: float, length: int, finish: str = "stop") -> Sample:
    s = Sample(group_index=group, prompt_index=group, prompt="p", prompt_text="p", prompt_ids=[1])
    s.reward, s.response_ids, s.finish_reason = reward, [0] * length, finish
    return s


def test_pass_at_k_avg_at_k_length_and_truncation() -> None:
    # prompt 0: one of two solved; prompt 1: none; k = 2
    samples = [_sample(0, 1.0, 2), _sample(0, 0.0, 4, "length"), _sample(1, 0.0, 3), _sample(1, -1.0, 3)]
    m = dataset_metrics("gsm8k", samples, k=2)
    assert m["eval/gsm8k/pass@2"] == 0.5
    assert m["eval/gsm8k/avg@2"] == 0.25
    assert m["eval/gsm8k/reward_mean"] == pytest.approx(0.0)
    assert m["eval/gsm8k/response_len_mean"] == 3.0
    assert m["eval/gsm8k/truncated_frac"] == 0.25
    assert m["eval/gsm8k/prompts"] == 2.0
    lines = table(m).splitlines()
    assert lines[0].split() == [
        "dataset",
        "reward_mean",
        "pass@2",
        "avg@2",
        "response_len_mean",
        "truncated_frac",
        "prompts",
    ]
    assert lines[1].split()[:4] == ["gsm8k", "0", "0.5", "0.25"]
