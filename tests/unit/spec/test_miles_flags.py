"""The alias and disposition tables against the spec itself, and the loader's messages built from them."""

from __future__ import annotations

import pytest

from miles.spec import load_spec
from miles.spec.fieldtypes import table_fields
from miles.spec.miles_flags import ALIASES, DISPOSITIONS, key_tables, unknown_key_hint
from miles.spec.tables import TABLES
from tests.unit.spec.specfiles import SpecFiles


def test_every_alias_names_an_existing_key_and_is_not_a_key_itself() -> None:
    keys = key_tables()
    for name, target in ALIASES.items():
        table, key = target.split(".")
        assert key in table_fields(TABLES[table]), (name, target)
        assert name not in keys, f"{name} is a spec key; it needs no alias"


def test_no_flag_has_both_a_key_and_a_disposition() -> None:
    keys = key_tables()
    for name in DISPOSITIONS:
        assert name not in keys, f"{name} is a spec key but also has a disposition"
        assert name not in ALIASES, name


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_the_loader_suggests_the_miles_key_for_each_alias(specs: SpecFiles, name: str) -> None:
    table, key = ALIASES[name].split(".")
    value = "bf16" if key == "dtype" else 2
    msg, _, _ = specs.error({"perf": {name: value}})
    assert "unknown key in [perf]" in msg
    where = key if table == "perf" else f"[{table}] {key}"
    assert where in msg.split(name, 1)[1], msg


@pytest.mark.parametrize("name", sorted(DISPOSITIONS))
def test_the_loader_refuses_each_disposition_with_its_reason(specs: SpecFiles, name: str) -> None:
    msg, _, _ = specs.error({"perf": {name: True}})
    assert DISPOSITIONS[name].reason in msg


def test_megatron_names_get_the_short_key(specs: SpecFiles) -> None:
    msg, _, _ = specs.error({"perf": {"tensor_model_parallel_size": 2}})
    assert "--tensor-model-parallel-size is tp" in msg
    msg, _, _ = specs.error({"train": {"tensor_model_parallel_size": 2}})
    assert "is [perf] tp" in msg


def test_a_suggestion_never_names_a_key_that_means_something_else(specs: SpecFiles) -> None:
    msg, _, _ = specs.error({"perf": {"attention_dropout": 0.1}})
    assert "attention_backend" not in msg and "0: the policy ratio" in msg
    msg, _, _ = specs.error({"perf": {"hidden_drop": 0.0}})
    assert "did you mean" not in msg
    msg, _, _ = specs.error({"rollout": {"rollout_batchsize": 8}})
    assert "did you mean rollout_batch_size?" in msg  # a typo still gets its key


def test_sglang_prefix_is_explained_in_the_sglang_table(specs: SpecFiles) -> None:
    msg, _, _ = specs.error({"sglang": {"sglang_chunked_prefill_size": 4096}})
    assert "without the prefix: chunked_prefill_size" in msg
    msg, _, _ = specs.error({"perf": {"sglang_mem_fraction_static": 0.5}})
    assert "[sglang] mem_fraction_static" in msg


def test_non_flag_names_get_no_flag_hint() -> None:
    assert unknown_key_hint("perf", "flux_capacitor") is None


def test_mode_left_out_is_split_when_the_engines_have_gpus_of_their_own(specs: SpecFiles) -> None:
    path, _ = specs.write({"cluster": {"actor_num_gpus_per_node": 4, "rollout_num_gpus": 4}})
    spec = load_spec(path)
    assert spec.cluster.mode == "split"
    assert any("mode not set" in n and '"split"' in n and "--colocate" in n for n in spec.notes)


def test_mode_left_out_without_engine_gpus_is_colocate_and_said(specs: SpecFiles) -> None:
    spec = load_spec(specs.write()[0])
    assert spec.cluster.mode == "colocate" and any('"colocate"' in n for n in spec.notes)
    explicit = load_spec(specs.write({"cluster": {"mode": "colocate"}})[0])
    assert explicit.notes == ()


def test_docs_migrating_lists_every_alias_and_disposition() -> None:
    from pathlib import Path

    text = (Path(__file__).parents[3] / "docs" / "migrating.md").read_text()
    for name, target in ALIASES.items():
        table, key = target.split(".")
        assert f"| `--{name.replace('_', '-')}` | `[{table}] {key}` |" in text, name
    for name, disp in DISPOSITIONS.items():
        row = f"| `--{name.replace('_', '-')}` |"
        assert row in text and disp.reason in text.split(row, 1)[1].split("\n", 1)[0], name


def test_every_key_name_lives_in_one_table() -> None:
    # miles convert and the loader's "belongs in [table]" hint place a flag by its name alone.
    assert {k: t for k, t in key_tables().items() if len(t) > 1} == {}
