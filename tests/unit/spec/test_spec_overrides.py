"""``--set table.key=value``: TOML values, bare strings, nested entries, and errors that name --set."""

from __future__ import annotations

from pathlib import Path

import pytest

from miles.spec import load_spec, parse_override
from tests.unit.spec.specfiles import SpecFiles


def test_overrides_apply_before_validation(specs: SpecFiles) -> None:
    path, _ = specs.write({"train": {"global_batch_size": 3}})  # invalid alone: 4 x 2 = 8 is not divisible by 3
    spec = load_spec(
        path,
        [
            "train.global_batch_size=4",
            "rollout.rollout_temperature=0.5",
            "run.plot=false",
            'slurm.modules=["cuda/12", "nccl"]',
            "eval.eval_prompt_data.gsm8k=data/gsm8k.jsonl",
            "eval.eval_interval=5",
        ],
    )
    assert spec.train.global_batch_size == 4 and spec.train.num_steps_per_rollout == 2
    assert spec.rollout.rollout_temperature == 0.5 and spec.run.plot is False
    assert spec.slurm.modules == ["cuda/12", "nccl"]
    assert spec.eval.eval_prompt_data == {"gsm8k": str(Path.cwd() / "data" / "gsm8k.jsonl")}  # --set: from here


def test_string_keys_take_the_text_as_is(specs: SpecFiles) -> None:
    path, _ = specs.write()
    spec = load_spec(
        path,
        [
            "run.name=exp-2",
            "slurm.time=08:00:00",
            "rollout.label_key=123",
            'slurm.partition="gpu"',
            "run.run_dir=/scratch/a b",
        ],
    )
    assert spec.run.name == "exp-2" and spec.slurm.time == "08:00:00" and spec.rollout.label_key == "123"
    assert spec.slurm.partition == "gpu" and spec.run.run_dir == "/scratch/a b"
    assert spec.ckpt.save == "/scratch/a b/checkpoints"


def test_later_overrides_win(specs: SpecFiles) -> None:
    path, _ = specs.write()
    assert load_spec(path, ["run.seed=1", "run.seed=2"]).run.seed == 2


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("run.seed=abc", '--set run.seed=abc: [run] seed: expected an integer, got the string "abc"'),
        ("run.seeed=3", "--set run.seeed=3: [run] seeed: unknown key in [run]; did you mean seed?"),
        ("runn.seed=3", "--set runn.seed=3: [runn]: unknown table; did you mean [run]?"),
        ("seed=3", "--set seed=3: expected --set TABLE.KEY=VALUE, e.g. --set rollout.rollout_batch_size=64"),
        ("run.seed", "--set run.seed: expected --set TABLE.KEY=VALUE"),
        ("run.name.x=1", "--set run.name.x=1: run.name is not a table, so run.name.x cannot be set"),
        ("run.seed.x=1", "--set run.seed.x=1: [run] seed: expected an integer, got the table { x = 1 }"),
        (
            "train.global_batch_size=3",
            "--set train.global_batch_size=3: [train] global_batch_size: rollout_batch_size (4) x "
            "n_samples_per_prompt (2) = 8 is not divisible by global_batch_size (3)",
        ),
    ],
    ids=["type", "unknown-key", "unknown-table", "no-table", "no-value", "not-a-table", "table-for-int", "knobs"],
)
def test_override_errors_name_set(specs: SpecFiles, override: str, expected: str) -> None:
    message, _, _ = specs.error(overrides=(override,))
    assert expected in message, message


def test_parse_override() -> None:
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override(" a . b = [1, 2] ") == (["a", "b"], [1, 2])
    assert parse_override("a.b={ x = 1 }") == (["a", "b"], {"x": 1})
    assert parse_override("a.b=not toml") == (["a", "b"], "not toml")
    assert parse_override("run.name=1e3") == (["run", "name"], "1e3")  # a string key keeps the text
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")
    with pytest.raises(ValueError):
        parse_override("a=1")


def test_an_inline_table_merges_and_colon_equals_replaces(specs: SpecFiles) -> None:
    """cli.md's `--set slurm.env={...}` keeps the spec's other variables; `:=` is the explicit replacement."""
    path, _ = specs.write({"slurm": {"env": {"NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "ib0"}}})
    merged = load_spec(path, ['slurm.env={NCCL_DEBUG="WARN"}']).slurm.env
    assert merged == {"NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "ib0", "NCCL_DEBUG": "WARN"}
    assert load_spec(path, ["slurm.env.NCCL_DEBUG=WARN"]).slurm.env == merged
    assert load_spec(path, ['slurm.env:={NCCL_DEBUG="WARN"}']).slurm.env == {"NCCL_DEBUG": "WARN"}
    assert load_spec(path, ["slurm.env:={}"]).slurm.env == {}
    assert load_spec(path, ["run.seed:=7"]).run.seed == 7  # `:=` on a plain key is a plain set
