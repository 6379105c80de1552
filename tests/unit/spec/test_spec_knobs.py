"""The four-knob invariant: each unknown derived, each error case shows the equation with the user's numbers."""

from __future__ import annotations

from typing import Any

import pytest

from miles.spec import load_spec
from miles.spec.knobs import resolve
from tests.unit.spec.specfiles import DROP, SpecFiles, line_of

KNOBS = ("rollout_batch_size", "n_samples_per_prompt", "global_batch_size", "num_steps_per_rollout")


def knob_changes(r: Any = DROP, n: Any = DROP, g: Any = DROP, s: Any = DROP) -> dict[str, dict[str, Any]]:
    return {
        "rollout": {"rollout_batch_size": r, "n_samples_per_prompt": n},
        "train": {"global_batch_size": g, "num_steps_per_rollout": s},
    }


def resolved(spec: Any) -> tuple[int | None, ...]:
    return (
        spec.rollout.rollout_batch_size,
        spec.rollout.n_samples_per_prompt,
        spec.train.global_batch_size,
        spec.train.num_steps_per_rollout,
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (dict(n=8, g=128, s=2), (32, 8, 128, 2)),  # rollout_batch_size derived
        (dict(r=32, g=64, s=4), (32, 8, 64, 4)),  # n_samples_per_prompt derived
        (dict(r=32, n=8, s=4), (32, 8, 64, 4)),  # global_batch_size derived
        (dict(r=32, n=8, g=128), (32, 8, 128, 2)),  # num_steps_per_rollout derived
        (dict(r=32, n=8, g=128, s=2), (32, 8, 128, 2)),  # all four, consistent
        (dict(r=32, g=16), (32, 1, 16, 2)),  # n defaults to 1, then steps derived
        (dict(r=32, s=4), (32, 1, 8, 4)),  # n defaults to 1, then global batch derived
        (dict(g=16, s=2), (32, 1, 16, 2)),  # n defaults to 1, then rollout batch derived
    ],
    ids=[
        "derive-rollout_batch_size",
        "derive-n_samples_per_prompt",
        "derive-global_batch_size",
        "derive-num_steps_per_rollout",
        "all-four",
        "n-default-derive-steps",
        "n-default-derive-gbs",
        "n-default-derive-rbs",
    ],
)
def test_derivation(specs: SpecFiles, given: dict[str, int], expected: tuple[int, ...]) -> None:
    path, _ = specs.write(knob_changes(**given))
    assert resolved(load_spec(path)) == expected


def test_four_inconsistent_shows_the_equation_and_the_ways_out(specs: SpecFiles) -> None:
    message, path, text = specs.error(knob_changes(r=32, n=8, g=100, s=2))
    line = line_of(text, "train", "num_steps_per_rollout")
    assert f"{path}:{line}: [train] num_steps_per_rollout: " in message
    assert (
        "rollout_batch_size (32) x n_samples_per_prompt (8) = 256 but global_batch_size (100) x "
        "num_steps_per_rollout (2) = 200"
    ) in message
    assert "leave out [rollout] n_samples_per_prompt to have it derived as 6" not in message  # 200/32 is not whole
    assert "leave out [rollout] rollout_batch_size to have it derived as 25" in message
    message, _, _ = specs.error(knob_changes(r=3, n=7, g=5, s=2))
    assert "3 x" not in message and "change them so that rollout_batch_size x n_samples_per_prompt" in message


@pytest.mark.parametrize(
    ("given", "blamed", "numbers", "fix"),
    [
        (
            dict(r=32, n=8, g=100),
            "global_batch_size",
            "rollout_batch_size (32) x n_samples_per_prompt (8) = 256 is not "
            "divisible by global_batch_size (100), so num_steps_per_rollout cannot be derived",
            "such as 64 or 128",
        ),
        (
            dict(r=32, n=8, s=3),
            "num_steps_per_rollout",
            "= 256 is not divisible by num_steps_per_rollout (3), so global_batch_size cannot be derived",
            "such as 2 or 4",
        ),
        (
            dict(n=3, g=16, s=2),
            "n_samples_per_prompt",
            "global_batch_size (16) x num_steps_per_rollout (2) = 32 is not "
            "divisible by n_samples_per_prompt (3), so rollout_batch_size cannot be derived",
            "such as 2 or 4",
        ),
        (
            dict(r=5, g=16, s=2),
            "rollout_batch_size",
            "= 32 is not divisible by rollout_batch_size (5), so n_samples_per_prompt cannot be derived",
            "such as 4 or 8",
        ),
    ],
    ids=["steps", "global_batch_size", "rollout_batch_size", "n_samples_per_prompt"],
)
def test_underivable(specs: SpecFiles, given: dict[str, int], blamed: str, numbers: str, fix: str) -> None:
    message, path, text = specs.error(knob_changes(**given))
    table = "rollout" if blamed in KNOBS[:2] else "train"
    assert f"{path}:{line_of(text, table, blamed)}: [{table}] {blamed}: " in message, message
    assert numbers in message and fix in message, message


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        (dict(r=32), "set 1 more of: [train] global_batch_size, [train] num_steps_per_rollout"),
        (dict(n=8, g=16), "set 1 more of: [rollout] rollout_batch_size, [train] num_steps_per_rollout"),
        (
            dict(),
            "set 2 more of: [rollout] rollout_batch_size, [train] global_batch_size, [train] num_steps_per_rollout",
        ),
    ],
    ids=["one-knob", "n-and-one", "none"],
)
def test_too_few_knobs(specs: SpecFiles, given: dict[str, int], missing: str) -> None:
    message, path, text = specs.error(knob_changes(**given))
    assert missing in message, message
    assert "three of them must be set" in message and "n_samples_per_prompt defaults to 1" in message


def test_resolve_is_pure() -> None:
    values = {
        "rollout_batch_size": 4,
        "n_samples_per_prompt": None,
        "global_batch_size": 2,
        "num_steps_per_rollout": None,
    }
    out, problems = resolve(values)
    assert problems == [] and out == {
        "rollout_batch_size": 4,
        "n_samples_per_prompt": 1,
        "global_batch_size": 2,
        "num_steps_per_rollout": 2,
    }
    assert values["n_samples_per_prompt"] is None
