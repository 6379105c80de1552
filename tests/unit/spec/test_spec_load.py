"""Strict loading: unknown tables and keys, types, files, TOML syntax and [sglang] pass-through."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from miles.errors import UserError
from miles.spec import SpecError, load_spec, passthrough
from tests.unit.spec.specfiles import SpecFiles, line_of, render


def test_quickstart_loads() -> None:
    spec = load_spec(Path(__file__).parents[3] / "configs" / "quickstart.toml")
    assert spec.train.num_steps_per_rollout == 1 and spec.run.run_dir == "runs/quickstart"  # 64 x 8 / 512


def test_spec_error_is_a_user_error() -> None:
    assert issubclass(SpecError, UserError) and SpecError.exit_code == 2


@pytest.mark.parametrize(
    ("changes", "table", "key", "expected"),
    [
        (
            {"rollout": {"rollout_batch_sise": 4}},
            "rollout",
            "rollout_batch_sise",
            "unknown key in [rollout]; did you mean rollout_batch_size?",
        ),
        (
            {"rollout": {"global_batch_size": 8}},
            "rollout",
            "global_batch_size",
            "unknown key in [rollout]; global_batch_size belongs in [train]",
        ),
        (
            {"rollout": {"rollout-seed": 1}},
            "rollout",
            "rollout-seed",
            "unknown key in [rollout]; write rollout_seed (underscores",
        ),
        ({"run": {"zzz": 1}}, "run", "zzz", "unknown key in [run]; the keys of [run] are listed in docs/spec.md"),
        ({"run": {"seed": "8"}}, "run", "seed", 'expected an integer, got the string "8"'),
        ({"run": {"seed": True}}, "run", "seed", "expected an integer, got true"),
        ({"run": {"plot": 1}}, "run", "plot", "expected true or false, got the integer 1"),
        ({"run": {"num_rollout": 2.5}}, "run", "num_rollout", "expected an integer, got the number 2.5"),
        ({"optimizer": {"lr": "1e-6"}}, "optimizer", "lr", 'expected a number, got the string "1e-6"'),
        (
            {"rollout": {"engine": "vllm"}},
            "rollout",
            "engine",
            'expected one of "sglang", "embedded", got the string "vllm"',
        ),
        (
            {"perf": {"recompute_granularity": "all"}},
            "perf",
            "recompute_granularity",
            'expected one of "full", "selective"',
        ),
        ({"rollout": {"label_key": 3}}, "rollout", "label_key", "expected a string, got the integer 3"),
        (
            {"rollout": {"rollout_stop_token_ids": [1, "2"]}},
            "rollout",
            "rollout_stop_token_ids",
            'expected a list of integers, got the list [1, "2"] (element 2 is the string "2")',
        ),
        (
            {"rollout": {"rollout_stop": "###"}},
            "rollout",
            "rollout_stop",
            'expected a list of strings, got the string "###"',
        ),
        (
            {"slurm": {"env": {"A": 1}}},
            "slurm",
            "env",
            "expected a table of strings, got the table { A = 1 } (entry 'A' is the integer 1)",
        ),
        ({"eval": {"eval_prompt_data": ["a.jsonl"]}}, "eval", "eval_prompt_data", "expected a table of strings"),
    ],
    ids=[
        "typo",
        "other-table",
        "dashes",
        "no-match",
        "str-for-int",
        "bool-for-int",
        "int-for-bool",
        "float-for-int",
        "str-for-float",
        "literal",
        "optional-literal",
        "optional-str",
        "list-element",
        "list",
        "dict-value",
        "dict",
    ],
)
def test_key_and_type_errors(
    specs: SpecFiles, changes: dict[str, dict[str, Any]], table: str, key: str, expected: str
) -> None:
    message, path, text = specs.error(changes)
    assert f"{path}:{line_of(text, table, key)}: [{table}] {key}: {expected}" in message, message


def test_int_is_accepted_for_float(specs: SpecFiles) -> None:
    path, _ = specs.write({"optimizer": {"lr": 1}, "grpo": {"eps_clip_c": 3}})
    spec = load_spec(path)
    assert spec.optimizer.lr == 1.0 and isinstance(spec.optimizer.lr, float)
    assert isinstance(spec.grpo.eps_clip_c, float)


def test_unquoted_time_says_to_quote_it(specs: SpecFiles) -> None:
    text = render() + "\n[slurm]\ntime = 04:00:00\n"
    message, path, _ = specs.error(text=text)
    assert (
        f"{path}:{len(text.splitlines())}: [slurm] time: expected a string, got the time 04:00:00 (put it in quotes"
        in message
    )


def test_unknown_table(specs: SpecFiles) -> None:
    message, path, text = specs.error(text=render() + "\n[rollouts]\nx = 1\n")
    assert f"{path}:{line_of(text, 'rollouts')}: [rollouts]: unknown table; did you mean [rollout]?" in message
    message, path, text = specs.error(text=render() + "\n[zzzz]\nx = 1\n")
    assert "unknown table; the tables are [run], [model]" in message


def test_top_level_key_and_non_table(specs: SpecFiles) -> None:
    message, path, text = specs.error(text="seed = 3\n" + render())
    assert f"{path}:1: seed: keys belong inside a table such as [run]; did you mean [run] seed?" in message
    message, path, text = specs.error(text="slurm = 3\n" + render())
    assert f"{path}:1: [slurm]: must be a table ([slurm] followed by key = value lines), got the integer 3" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "nope.toml")
    assert (
        str(info.value)
        == f"{tmp_path / 'nope.toml'}: no such file; pass the path of a TOML run spec, e.g. configs/quickstart.toml"
    )


def test_toml_syntax_error_names_the_line(specs: SpecFiles) -> None:
    message, path, _ = specs.error(text='[run]\nname = "a"\nseed = = 3\n')
    assert message.startswith(f"{path}:3: invalid TOML: "), message


def test_server_args_is_not_a_key(specs: SpecFiles) -> None:
    message, path, text = specs.error({"sglang": {"server_args": {"a": 1}}})
    assert f"{path}:{line_of(text, 'sglang', 'server_args')}: [sglang] server_args: is filled by miles" in message


@pytest.fixture
def flags_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small flag table in the format of miles/spec/sglang_flags.json (miles.sglang.flags)."""
    path = tmp_path / "sglang_flags.json"
    path.write_text(
        json.dumps(
            {
                "version": "0.0",
                "flags": {
                    "chunked_prefill_size": {"type": "int", "default": None},
                    "attention_backend": {"type": "str", "default": None, "choices": ["triton", "fa3"]},
                    "cuda_graph_bs": {"type": "list", "item_type": "int", "default": None},
                    "json_model_override_args": {"type": "json", "default": "{}"},
                    "enable_metrics": {"type": "bool", "default": False},
                    "schedule_conservativeness": {"type": "float", "default": 1.0},
                    "tp_size": {"type": "int", "default": 1, "aliases": ["tensor_parallel_size"]},
                    "grammar_backend": {"type": "str", "default": None, "aliases": ["grammar"]},
                },
            }
        )
    )
    monkeypatch.setattr(passthrough, "FLAGS_FILE", path)
    return path


def test_sglang_passthrough(specs: SpecFiles, flags_file: Path) -> None:
    sglang = {
        "mem_fraction_static": 0.5,
        "chunked_prefill_size": 4096,
        "attention_backend": "fa3",
        "cuda_graph_bs": [1, 2, 4],
        "json_model_override_args": {"rope_scaling": {"factor": 2}},
        "enable_metrics": True,
        "schedule_conservativeness": 1,
        "grammar": "xgrammar",
    }
    path, _ = specs.write({"sglang": sglang})
    spec = load_spec(path)
    assert spec.sglang.mem_fraction_static == 0.5
    assert spec.sglang.server_args == {k: v for k, v in sglang.items() if k != "mem_fraction_static"}


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (
            "chunked_prefil_size",
            1,
            "is neither a miles [sglang] key nor a flag of the pinned SGLang (sglang.launch_server --help); did you "
            "mean chunked_prefill_size?",
        ),
        ("chunked_prefill_size", "big", 'expected an integer (SGLang --chunked-prefill-size), got the string "big"'),
        (
            "attention_backend",
            "flash",
            'expected one of "triton", "fa3" (SGLang --attention-backend), got the string "flash"',
        ),
        ("cuda_graph_bs", [1, "2"], 'expected an integer (SGLang --cuda-graph-bs), got the string "2"'),
        ("cuda_graph_bs", 4, "expected a list of integers (SGLang --cuda-graph-bs), got the integer 4"),
        ("enable_metrics", "yes", "expected true or false (SGLang --enable-metrics)"),
        (
            "tp_size",
            2,
            "is set by miles, not passed through to SGLang: set [sglang] rollout_num_gpus_per_engine instead",
        ),
        (
            "tensor_parallel_size",
            2,
            "is set by miles, not passed through to SGLang: set [sglang] rollout_num_gpus_per_engine",
        ),
        ("chunked-prefill-size", 2, "write SGLang flags with underscores: chunked_prefill_size"),
    ],
    ids=["typo", "type", "choices", "list-item", "list", "bool", "managed", "managed-alias", "dashes"],
)
def test_sglang_flag_errors(specs: SpecFiles, flags_file: Path, key: str, value: Any, expected: str) -> None:
    message, path, text = specs.error({"sglang": {key: value}})
    assert f"{path}:{line_of(text, 'sglang', key)}: [sglang] {key}: {expected}" in message, message


def test_sglang_without_flag_file_passes_names_through(
    specs: SpecFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(passthrough, "FLAGS_FILE", tmp_path / "absent.json")
    path, _ = specs.write({"sglang": {"some_future_flag": 3}})
    assert load_spec(path).sglang.server_args == {"some_future_flag": 3}
    message, _, _ = specs.error({"sglang": {"model_path": "/m"}})  # managed flags are refused even so
    assert "[sglang] model_path: is set by miles" in message


def test_the_committed_flag_file_is_read() -> None:
    flags = passthrough.load_flags()
    assert flags is not None and flags["chunked_prefill_size"]["type"] == "int"
    assert passthrough.check_flag("chunked_prefill_size", 4096, flags) is None
    assert "did you mean chunked_prefill_size?" in (passthrough.check_flag("chunked_prefil_size", 1, flags) or "")
    for managed in passthrough.MANAGED_FLAGS:  # every flag miles manages is a real flag of the pinned SGLang
        assert managed in flags or any(managed in e.get("aliases", []) for e in flags.values()), managed
