"""The bad-input corpus: one valid workspace broken in one way per case, with what the error must say.

Each case changes the workspace of :mod:`tests.unit.preflight.workspace` and
returns extra command-line arguments; ``expect`` are substrings of the error
(``{root}`` is the workspace, ``{spec}`` the spec file), naming the file, line
or key and the fix. ``test_corpus.py`` runs every case through ``miles
validate``, ``miles submit`` and ``miles run``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from tests.unit.preflight.workspace import DROP, QWEN2, ROWS, Workspace

Build = Callable[[Workspace], list[str]]


@dataclass(frozen=True)
class Case:
    id: str
    area: str
    build: Build
    expect: tuple[str, ...]


CASES: list[Case] = []


def case(area: str, *expect: str) -> Callable[[Build], Build]:
    def register(build: Build) -> Build:
        CASES.append(Case(build.__name__, area, build, expect))
        return build

    return register


def spec_with(ws: Workspace, **tables: dict[str, object]) -> list[str]:
    ws.write_spec(tables)
    return []


# ---------------------------------------------------------------- spec


@case("spec", "[rollout] rollout_batch_sise: unknown key", "did you mean rollout_batch_size?")
def spec_unknown_key(ws: Workspace) -> list[str]:
    return spec_with(ws, rollout={"rollout_batch_sise": 4})


@case("spec", "[run] seed: expected an integer")
def spec_wrong_type(ws: Workspace) -> list[str]:
    return spec_with(ws, run={"seed": "x"})


@case("spec", "invalid TOML")
def spec_invalid_toml(ws: Workspace) -> list[str]:
    ws.spec.write_text("[run]\nname = \n")
    return []


@case("spec", "[rollout] prompt_data:", "must be a .jsonl or .parquet file")
def spec_data_suffix(ws: Workspace) -> list[str]:
    ws.write("prompts.csv", "prompt,label\n")
    return spec_with(ws, rollout={"prompt_data": "prompts.csv"})


@case("spec", "set the reward")
def spec_no_reward(ws: Workspace) -> list[str]:
    return spec_with(ws, rollout={"rm_type": DROP})


@case("spec", "[rollout] custom_rm_path:", 'write "mypkg.rewards:score"')
def spec_code_path_shape(ws: Workspace) -> list[str]:
    return spec_with(ws, rollout={"rm_type": DROP, "custom_rm_path": "mypkg.rewards.score"})


@case("spec", "[tablo]", "unknown table")
def spec_unknown_table(ws: Workspace) -> list[str]:
    return spec_with(ws, tablo={"x": 1})


@case("spec", "expected --set TABLE.KEY=VALUE")
def spec_bad_override(ws: Workspace) -> list[str]:
    return ["--set", "rollout_batch_size"]


@case("spec", "[perf] tp:")
def spec_out_of_range(ws: Workspace) -> list[str]:
    return spec_with(ws, perf={"tp": 0})


@case("spec", "[eval] eval_prompt_data:", "must be a .jsonl or .parquet file")
def spec_eval_suffix(ws: Workspace) -> list[str]:
    return spec_with(ws, eval={"eval_prompt_data": {"dev": "dev.txt"}, "eval_interval": 1})


# ---------------------------------------------------------------- data


@case(
    "data",
    "[rollout] prompt_data:",
    "{root}/missing.jsonl: no such file or directory",
    "set rollout.prompt_data to an existing .jsonl or .parquet file",
)
def data_missing(ws: Workspace) -> list[str]:
    return spec_with(ws, rollout={"prompt_data": f"{ws.root}/missing.jsonl"})


@case("data", "data/missing.jsonl: no such file or directory", "relative paths count from the directory")
def data_missing_relative(ws: Workspace) -> list[str]:
    return spec_with(ws, rollout={"prompt_data": "data/missing.jsonl"})


@case("data", "--set rollout.prompt_data=other.jsonl: [rollout] prompt_data: {root}/other.jsonl: no such file")
def data_missing_from_override(ws: Workspace) -> list[str]:
    return ["--set", "rollout.prompt_data=other.jsonl"]


@case("data", "dir.jsonl is a directory", "set rollout.prompt_data to a .jsonl or .parquet file")
def data_directory(ws: Workspace) -> list[str]:
    (ws.root / "dir.jsonl").mkdir()
    return spec_with(ws, rollout={"prompt_data": "dir.jsonl"})


@case("data", "rollout.prompt_data = '{root}/empty.jsonl': the file holds no records", "write one JSON object per line")
def data_empty(ws: Workspace) -> list[str]:
    ws.write("empty.jsonl", "")
    return spec_with(ws, rollout={"prompt_data": "empty.jsonl"})


@case("data", "'{root}/blank.jsonl': the file holds no records")
def data_blank_lines(ws: Workspace) -> list[str]:
    ws.write("blank.jsonl", "\n  \n\n")
    return spec_with(ws, rollout={"prompt_data": "blank.jsonl"})


@case("data", "bad3.jsonl:3: invalid JSON", "fix or remove this line")
def data_invalid_json_line_3(ws: Workspace) -> list[str]:
    ws.write("bad3.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS[:2]) + '{"prompt": "1+1=", \n')
    return spec_with(ws, rollout={"prompt_data": "bad3.jsonl"})


@case("data", "gaps.jsonl:5: invalid JSON")
def data_invalid_json_after_blank_lines(ws: Workspace) -> list[str]:
    ws.write("gaps.jsonl", json.dumps(ROWS[0]) + "\n\n\n" + json.dumps(ROWS[1]) + "\nnot json\n")
    return spec_with(ws, rollout={"prompt_data": "gaps.jsonl"})


@case("data", "array.jsonl:1: each line must be a JSON object, got list")
def data_not_an_object(ws: Workspace) -> list[str]:
    ws.write("array.jsonl", '["1+1=", "2"]\n')
    return spec_with(ws, rollout={"prompt_data": "array.jsonl"})


@case(
    "data",
    "nokey.jsonl:2: missing prompt key 'prompt' (keys present: label, question)",
    "set rollout.input_key to the key that holds the prompt",
)
def data_missing_input_key(ws: Workspace) -> list[str]:
    ws.write_rows("nokey.jsonl", [ROWS[0], {"question": "1+1=", "label": "2"}])
    return spec_with(ws, rollout={"prompt_data": "nokey.jsonl"})


@case("data", "nolabel.jsonl:1: missing label key 'label' (keys present: prompt)", "add it or change rollout.label_key")
def data_missing_label_key(ws: Workspace) -> list[str]:
    ws.write_rows("nolabel.jsonl", [{"prompt": "1+1="}])
    return spec_with(ws, rollout={"prompt_data": "nolabel.jsonl"})


@case("data", "answer.jsonl:1: missing label key 'answer'", "rollout.label_key")
def data_label_key_renamed(ws: Workspace) -> list[str]:
    ws.write_rows("answer.jsonl", ROWS)
    return spec_with(ws, rollout={"prompt_data": "answer.jsonl", "label_key": "answer"})


@case("data", "num.jsonl:1: prompt must be a string or a list of chat messages, got int")
def data_prompt_wrong_type(ws: Workspace) -> list[str]:
    ws.write_rows("num.jsonl", [{"prompt": 7, "label": "7"}])
    return spec_with(ws, rollout={"prompt_data": "num.jsonl"})


@case("data", "chat.jsonl:1: prompt is a list of chat messages; set rollout.apply_chat_template = true")
def data_chat_without_template(ws: Workspace) -> list[str]:
    ws.write_rows("chat.jsonl", [{"prompt": [{"role": "user", "content": "1+1="}], "label": "2"}])
    return spec_with(ws, rollout={"prompt_data": "chat.jsonl"})


@case("data", "msg.jsonl:1: prompt[1] must be a message object with 'role' and 'content'")
def data_chat_message_shape(ws: Workspace) -> list[str]:
    ws.write_rows("msg.jsonl", [{"prompt": [{"role": "user", "content": "hi"}, {"content": "no role"}], "label": "2"}])
    return spec_with(ws, rollout={"prompt_data": "msg.jsonl", "apply_chat_template": True})


@case("data", "meta.jsonl:1: metadata must be an object (dict), got list")
def data_metadata_not_object(ws: Workspace) -> list[str]:
    ws.write_rows("meta.jsonl", [{"prompt": "1+1=", "label": "2", "metadata": [1, 2]}])
    return spec_with(ws, rollout={"prompt_data": "meta.jsonl"})


@case("data", "metastr.jsonl:1: metadata is a string that is not JSON; it must be an object")
def data_metadata_string(ws: Workspace) -> list[str]:
    ws.write_rows("metastr.jsonl", [{"prompt": "1+1=", "label": "2", "metadata": "{oops"}])
    return spec_with(ws, rollout={"prompt_data": "metastr.jsonl"})


@case("data", "latin1.jsonl:2: not UTF-8 text")
def data_not_utf8(ws: Workspace) -> list[str]:
    ws.write("latin1.jsonl", json.dumps(ROWS[0]).encode() + b'\n{"prompt": "caf\xe9", "label": "1"}\n')
    return spec_with(ws, rollout={"prompt_data": "latin1.jsonl"})


@case("data", "late.jsonl:100: invalid JSON")
def data_bad_row_100(ws: Workspace) -> list[str]:
    ws.write("late.jsonl", "".join(json.dumps(ROWS[i % 8]) + "\n" for i in range(99)) + "{\n")
    return spec_with(ws, rollout={"prompt_data": "late.jsonl"})


@case("data", "rows.parquet:row 1: missing prompt key 'prompt' (keys present: label, question)")
def data_parquet_missing_key(ws: Workspace) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"question": "1+1=", "label": "2"}]), ws.root / "rows.parquet")
    return spec_with(ws, rollout={"prompt_data": "rows.parquet"})


@case("data", "broken.parquet: not a readable parquet file")
def data_parquet_corrupt(ws: Workspace) -> list[str]:
    ws.write("broken.parquet", b"PAR1 this is not parquet")
    return spec_with(ws, rollout={"prompt_data": "broken.parquet"})


# ---------------------------------------------------------------- eval


def _eval(ws: Workspace, path: str, **more: object) -> list[str]:
    return spec_with(ws, eval={"eval_prompt_data": {"dev": path}, "eval_interval": 1, **more})


@case(
    "eval",
    "[eval] eval_prompt_data.dev:",
    "dev.jsonl: no such file or directory",
    "set eval.eval_prompt_data.dev to an existing .jsonl or .parquet file",
)
def eval_missing(ws: Workspace) -> list[str]:
    return _eval(ws, "dev.jsonl")


@case("eval", "dev.jsonl:2: invalid JSON")
def eval_invalid_json(ws: Workspace) -> list[str]:
    ws.write("dev.jsonl", json.dumps(ROWS[0]) + "\n{]\n")
    return _eval(ws, "dev.jsonl")


@case("eval", "eval.eval_prompt_data.dev = '{root}/dev.jsonl': the file holds no records")
def eval_empty(ws: Workspace) -> list[str]:
    ws.write("dev.jsonl", "")
    return _eval(ws, "dev.jsonl")


@case("eval", "dev.jsonl:1: missing prompt key 'problem' (keys present: label, prompt)", "set eval.eval_input_key")
def eval_own_input_key(ws: Workspace) -> list[str]:
    ws.write_rows("dev.jsonl", ROWS)
    return _eval(ws, "dev.jsonl", eval_input_key="problem")


@case("eval", "dev.jsonl:1: missing label key 'label'", "rollout.label_key (or eval.eval_label_key)")
def eval_inherited_label_key(ws: Workspace) -> list[str]:
    ws.write_rows("dev.jsonl", [{"prompt": "1+1="}])
    return _eval(ws, "dev.jsonl")


@case("eval", "dev.jsonl:1: missing label key 'solution'", "eval.eval_label_key")
def eval_own_label_key(ws: Workspace) -> list[str]:
    ws.write_rows("dev.jsonl", ROWS)
    return _eval(ws, "dev.jsonl", eval_label_key="solution")


@case("eval", "2 problems with the run's inputs", "a.jsonl: no such file", "b.jsonl:1: invalid JSON")
def eval_two_bad_sets(ws: Workspace) -> list[str]:
    ws.write("b.jsonl", "nope\n")
    return spec_with(ws, eval={"eval_prompt_data": {"a": "a.jsonl", "b": "b.jsonl"}, "eval_interval": 1})


@case("eval", "dev.jsonl is a directory", "set eval.eval_prompt_data.dev to a .jsonl or .parquet file")
def eval_directory(ws: Workspace) -> list[str]:
    (ws.root / "dev.jsonl").mkdir()
    return _eval(ws, "dev.jsonl")


# ---------------------------------------------------------------- model


def _model(ws: Workspace, path: str, backend: str = "fsdp", engine: str = "embedded", **model: object) -> list[str]:
    return spec_with(
        ws,
        model={"builtin": DROP, "hf_checkpoint": path, **model},
        perf={"backend": backend},
        rollout={"engine": engine},
    )


@case("model", "[model] hf_checkpoint:", "nomodel: no such file or directory", "set [model] hf_checkpoint")
def model_missing_dir(ws: Workspace) -> list[str]:
    return _model(ws, "nomodel")


@case("model", "model.bin is a file, not a directory")
def model_is_a_file(ws: Workspace) -> list[str]:
    ws.write("model.bin", "x")
    return _model(ws, "model.bin")


@case("model", "has no config.json", "a directory written by save_pretrained has one")
def model_no_config(ws: Workspace) -> list[str]:
    ws.model_dir()
    return _model(ws, "model")


@case("model", "model/config.json:3: invalid JSON", "restore the file")
def model_config_invalid_json(ws: Workspace) -> list[str]:
    ws.model_dir(config_text='{\n  "model_type": "qwen2",\n  "hidden_size": ,\n}')
    return _model(ws, "model")


@case("model", "model/config.json: expected a JSON object, got list")
def model_config_not_object(ws: Workspace) -> list[str]:
    ws.model_dir(config=[QWEN2])
    return _model(ws, "model")


@case("model", "config.json has no model_type", "re-export it with save_pretrained")
def model_no_model_type(ws: Workspace) -> list[str]:
    ws.model_dir(config={k: v for k, v in QWEN2.items() if k != "model_type"})
    return _model(ws, "model")


@case(
    "model",
    "model_type 'nosucharch' (NoSuchArchForCausalLM) is not a causal LM that the installed transformers",
    '[perf] backend = "fsdp" and [rollout] engine = "embedded"',
)
def model_unknown_architecture(ws: Workspace) -> list[str]:
    ws.model_dir(config={**QWEN2, "model_type": "nosucharch", "architectures": ["NoSuchArchForCausalLM"]})
    return _model(ws, "model")


@case("model", "model_type 'gpt2' (GPT2LMHeadModel) has no Megatron mapping", 'set [perf] backend = "fsdp"')
def model_no_megatron_mapping(ws: Workspace) -> list[str]:
    ws.model_dir(config={"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    return _model(ws, "model", backend="megatron")


@case(
    "model",
    "model_type 'mistral' (MistralForCausalLM) has no Megatron mapping",
    "supported: qwen2 (Qwen2ForCausalLM), qwen3 (Qwen3ForCausalLM), llama (LlamaForCausalLM), qwen3_moe",
)
def model_mistral_on_megatron(ws: Workspace) -> list[str]:
    ws.model_dir(config={**QWEN2, "model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    return _model(ws, "model", backend="megatron")


@case("model", "2 problems with the run's inputs", "has no Megatron mapping", "is not a causal LM")
def model_no_backend_supports(ws: Workspace) -> list[str]:
    ws.model_dir(config={"model_type": "nosucharch", "architectures": ["NoSuchArch"]})
    return _model(ws, "model", backend="megatron")


@case("model", "ships its own modelling code (auto_map): set [model] trust_remote_code = true")
def model_remote_code_not_trusted(ws: Workspace) -> list[str]:
    ws.model_dir(
        config={
            "model_type": "custom_lm",
            "architectures": ["CustomLM"],
            "auto_map": {"AutoModelForCausalLM": "modeling_custom.CustomLM"},
        }
    )
    return _model(ws, "model")


@case(
    "model",
    "model has no tokenizer (none of tokenizer.json, tokenizer.model",
    "copy the tokenizer files of the base model into it",
)
def model_no_tokenizer(ws: Workspace) -> list[str]:
    ws.model_dir(config=QWEN2, tokenizer=False)
    return _model(ws, "model")


@case("model", "model/tokenizer_config.json:1: invalid JSON")
def model_tokenizer_config_invalid(ws: Workspace) -> list[str]:
    ws.model_dir(config=QWEN2, extra={"tokenizer_config.json": "{'single': 'quotes'}"})
    return _model(ws, "model")


@case("model", "model holds no weights (*.safetensors or pytorch_model*.bin)")
def model_no_weights(ws: Workspace) -> list[str]:
    ws.model_dir(config=QWEN2, weights=False)
    return _model(ws, "model")


@case("model", "3 problems with the run's inputs", "has no Megatron mapping", "no weights", "no tokenizer")
def model_everything_wrong(ws: Workspace) -> list[str]:
    ws.model_dir(config={"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, tokenizer=False, weights=False)
    return _model(ws, "model", backend="megatron")


# ---------------------------------------------------------------- reward and filter code


def _reward(ws: Workspace, path: str, **more: object) -> list[str]:
    return spec_with(ws, rollout={"rm_type": DROP, "custom_rm_path": path, **more})


@case(
    "reward",
    "rollout.custom_rm_path = 'nosuchmodule:f': cannot import module 'nosuchmodule'",
    "Check PYTHONPATH",
    "pass --skip-check code",
)
def reward_no_module(ws: Workspace) -> list[str]:
    return _reward(ws, "nosuchmodule:f")


@case(
    "reward",
    "rollout.custom_rm_path = 'os:path': module 'os' has no callable 'path' ('path' is a module)",
    "name a function defined in that module",
)
def reward_not_callable(ws: Workspace) -> list[str]:
    return _reward(ws, "os:path")


@case("reward", "module 'math' has no callable 'pi' ('pi' is a float)")
def reward_constant(ws: Workspace) -> list[str]:
    return _reward(ws, "math:pi")


@case("reward", "module 'json' has no callable 'score'")
def reward_no_function(ws: Workspace) -> list[str]:
    return _reward(ws, "json:score")


@case("reward", "rollout.custom_rm_path: no such file", "myreward.py")
def reward_file_missing(ws: Workspace) -> list[str]:
    return _reward(ws, "myreward.py:score")


@case("reward", "executing", "boom.py' failed: ZeroDivisionError", "pass --skip-check code")
def reward_file_raises(ws: Workspace) -> list[str]:
    ws.write("boom.py", "x = 1 / 0\ndef score(sample):\n    return 1.0\n")
    return _reward(ws, "boom.py:score")


@case("reward", "syntax.py' failed: SyntaxError")
def reward_file_syntax_error(ws: Workspace) -> list[str]:
    ws.write("syntax.py", "def score(sample)\n    return 1.0\n")
    return _reward(ws, "syntax.py:score")


@case("reward", "cannot import module 'rm_dep_missing'", "No module named 'not_installed_here'")
def reward_module_dependency_missing(ws: Workspace) -> list[str]:
    ws.write("rm_dep_missing.py", "import not_installed_here\ndef score(sample):\n    return 1.0\n")
    return _reward(ws, "rm_dep_missing:score")


@case(
    "reward",
    "rollout.custom_rm_path = '{root}/three.py:score' takes (a, b, c)",
    "cannot be called as f(sample) or f(args, sample)",
)
def reward_three_arguments(ws: Workspace) -> list[str]:
    ws.write("three.py", "def score(a, b, c):\n    return 1.0\n")
    return _reward(ws, "three.py:score")


@case("reward", "takes ()", "give it one required positional argument (the sample)")
def reward_no_arguments(ws: Workspace) -> list[str]:
    ws.write("none.py", "def score():\n    return 1.0\n")
    return _reward(ws, "none.py:score")


@case("reward", "takes (*, sample)")
def reward_keyword_only(ws: Workspace) -> list[str]:
    ws.write("kwonly.py", "def score(*, sample):\n    return 1.0\n")
    return _reward(ws, "kwonly.py:score")


@case("reward", "rm_group_sig.py:score' takes (a, b, c, d)")
def reward_group_signature(ws: Workspace) -> list[str]:
    ws.write("rm_group_sig.py", "def score(a, b, c, d):\n    return [1.0]\n")
    return _reward(ws, "rm_group_sig.py:score", group_rm=True)


@case("reward", "rollout.rm_type = 'nosuchrm' is not a built-in reward", "set rollout.custom_rm_path")
def reward_unknown_builtin(ws: Workspace) -> list[str]:
    return spec_with(ws, rollout={"rm_type": "nosuchrm"})


@case("reward", 'rollout.rm_type = "remote_rm": set rollout.rm_url')
def reward_remote_without_url(ws: Workspace) -> list[str]:
    return spec_with(ws, rollout={"rm_type": "remote_rm"})


@case("reward", "rollout.dynamic_sampling_filter_path = 'nosuchfilter:keep': cannot import module 'nosuchfilter'")
def filter_no_module(ws: Workspace) -> list[str]:
    return spec_with(ws, rollout={"dynamic_sampling_filter_path": "nosuchfilter:keep"})


@case("reward", "flt.py:keep' takes (samples)", "cannot be called as f(args, samples)")
def filter_one_argument(ws: Workspace) -> list[str]:
    ws.write("flt.py", "def keep(samples):\n    return True\n")
    return spec_with(ws, rollout={"dynamic_sampling_filter_path": "flt.py:keep"})


@case("reward", "2 problems with the run's inputs", "custom_rm_path", "dynamic_sampling_filter_path")
def reward_and_filter_both_bad(ws: Workspace) -> list[str]:
    return spec_with(
        ws, rollout={"rm_type": DROP, "custom_rm_path": "os:sep", "dynamic_sampling_filter_path": "os:curdir"}
    )


# ---------------------------------------------------------------- resume


@case(
    "resume",
    "[ckpt] save:",
    "cannot resume from",
    "rollout-000002",
    "rollout.rollout_seed: checkpoint has 7, spec has 42",
    "Restore these values, or start a new run",
)
def resume_changed_seed(ws: Workspace) -> list[str]:
    ws.checkpoint(["rollout.rollout_seed=7"])
    return []


@case("resume", "model.dtype: checkpoint has 'bfloat16', spec has 'float32'")
def resume_changed_dtype(ws: Workspace) -> list[str]:
    ws.checkpoint(["model.dtype=bfloat16"])
    return []


@case("resume", "rollout.prompt_data: checkpoint has '{root}/old.jsonl', spec has '{root}/prompts.jsonl'")
def resume_changed_data(ws: Workspace) -> list[str]:
    ws.write_rows("old.jsonl", ROWS)
    ws.checkpoint(["rollout.prompt_data=old.jsonl"])
    return []


@case("resume", "perf.backend: checkpoint has 'megatron', spec has 'fsdp'", "train.global_batch_size")
def resume_two_changes(ws: Workspace) -> list[str]:
    ws.checkpoint(["perf.backend=megatron", "train.global_batch_size=4", "train.num_steps_per_rollout=2"])
    return []


@case("resume", "rollout-000004", "run.seed: checkpoint has 5")
def resume_newest_checkpoint_decides(ws: Workspace) -> list[str]:
    ws.checkpoint([], rollout_id=2)
    ws.checkpoint(["run.seed=5"], rollout_id=4)
    return []


@case("resume", "rollout-000002", "run.seed: checkpoint has 9")
def resume_unreadable_newest_falls_back(ws: Workspace) -> list[str]:
    ws.checkpoint(["run.seed=9"], rollout_id=2)
    ws.checkpoint([], rollout_id=4, driver="{truncated")
    return []


@case("resume", "[ckpt] load:", "elsewhere/ckpts: no such file or directory", "remove [ckpt] load")
def resume_load_missing(ws: Workspace) -> list[str]:
    return spec_with(ws, ckpt={"load": "elsewhere/ckpts"})


@case("resume", "[ckpt] load:", "base/rollout-000003", "rollout.n_samples_per_prompt: checkpoint has 4, spec has 2")
def resume_load_changed(ws: Workspace) -> list[str]:
    ws.checkpoint(["rollout.n_samples_per_prompt=4", "train.global_batch_size=16"], rollout_id=3, root="base")
    return spec_with(ws, ckpt={"load": "base"})


# ---------------------------------------------------------------- several areas at once


@case(
    "mixed",
    "3 problems with the run's inputs",
    "prompts.jsonl:1: invalid JSON",
    "nomodel: no such file",
    "cannot import module 'nosuchmodule'",
)
def mixed_data_model_reward(ws: Workspace) -> list[str]:
    ws.write("prompts.jsonl", "{\n")
    return spec_with(
        ws,
        model={"builtin": DROP, "hf_checkpoint": "nomodel"},
        rollout={"rm_type": DROP, "custom_rm_path": "nosuchmodule:f"},
    )
