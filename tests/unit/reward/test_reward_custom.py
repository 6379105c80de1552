"""Which reward signatures miles can call: f(sample) or f(config, sample), sync or async."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from miles.reward.custom import call_problem


async def async_reward(sample: Any) -> float:
    return 1.0


def with_config(args: Any, sample: Any, *, scale: float = 1.0) -> float:
    return scale


def three(a: Any, b: Any, c: Any) -> float:
    return 0.0


@pytest.mark.parametrize(
    "fn",
    [
        lambda sample: 1.0,
        async_reward,
        with_config,
        lambda *samples: 1.0,
        lambda sample, extra=2: 1.0,
        functools.partial(three, 1),
        len,
    ],
)
def test_callable_rewards_pass(fn: Any) -> None:
    assert call_problem(fn, "r") is None


@pytest.mark.parametrize("fn", [lambda: 1.0, three, lambda *, sample: 1.0])
def test_uncallable_rewards_say_how_they_are_called(fn: Any) -> None:
    why = call_problem(fn, "rollout.custom_rm_path = 'x:f'")
    assert why is not None and why.startswith("rollout.custom_rm_path = 'x:f' takes (")
    assert "f(sample) or f(args, sample)" in why
