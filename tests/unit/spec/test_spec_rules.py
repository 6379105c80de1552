"""One test per cross-field rule (miles.spec.rules) and per range: the message names file:line, the key and the fix."""

from __future__ import annotations

from typing import Any

import pytest

from miles.spec import load_spec
from tests.unit.spec.specfiles import DROP, SpecFiles, line_of

# (id, changes, table, key the message is about (None: the table), a phrase of the fix)
CASES: list[tuple[str, dict[str, dict[str, Any]], str, str | None, str]] = [
    ("length-both", {"run": {"num_epoch": 2}}, "run", "num_rollout", "both are set; keep one"),
    ("length-neither", {"run": {"num_rollout": DROP}}, "run", None, "set one, e.g. num_rollout = 100"),
    ("name-slash", {"run": {"name": "a/b"}}, "run", "name", "without '/'"),
    ("name-newline", {"run": {"name": "a\nb"}}, "run", "name", "control characters"),
    ("model-both", {"model": {"hf_checkpoint": "/m"}}, "model", "builtin", "not both: remove one"),
    (
        "model-neither",
        {"model": {"builtin": DROP, "dtype": "float32"}},
        "model",
        None,
        'hf_checkpoint = "/path/to/hf-model-dir"',
    ),
    ("model-builtin-unknown", {"model": {"builtin": "tiny-arithm"}}, "model", "builtin", "did you mean 'tiny-arith'?"),
    (
        "prompt-data-missing",
        {"rollout": {"prompt_data": DROP}},
        "rollout",
        "prompt_data",
        'prompt_data = "/path/to/prompts.jsonl"',
    ),
    (
        "prompt-data-suffix",
        {"rollout": {"prompt_data": "p.csv"}},
        "rollout",
        "prompt_data",
        "must be a .jsonl or .parquet file",
    ),
    ("reward-missing", {"rollout": {"rm_type": DROP}}, "rollout", None, "set the reward: one of rm_type"),
    ("reward-two", {"rollout": {"custom_rm_path": "m:f"}}, "rollout", "custom_rm_path", "remove all but one"),
    (
        "custom-rm-dotted",
        {"rollout": {"rm_type": DROP, "custom_rm_path": "pkg.mod.score"}},
        "rollout",
        "custom_rm_path",
        'write "pkg.mod:score"',
    ),
    (
        "filter-path",
        {"rollout": {"dynamic_sampling_filter_path": "not a path"}},
        "rollout",
        "dynamic_sampling_filter_path",
        '"module:function"',
    ),
    (
        "rm-url-scheme",
        {"rollout": {"rm_type": DROP, "rm_url": "ftp://x/y"}},
        "rollout",
        "rm_url",
        "http:// or https://",
    ),
    ("group-rm", {"rollout": {"group_rm": True}}, "rollout", "group_rm", "set custom_rm_path, or remove group_rm"),
    (
        "dynamic-sampling-with-custom-generation",
        {"rollout": {"over_sampling_batch_size": 8, "custom_generate_function_path": "m:f"}},
        "rollout",
        "over_sampling_batch_size",
        "cannot run a custom generate or rollout function yet",
    ),
    (
        "custom-generation-behind-a-router-without-affinity",
        {
            "rollout": {"custom_generate_function_path": "m:f"},
            "sglang": {"use_router": True, "router_policy": "cache_aware"},
        },
        "sglang",
        "router_policy",
        'use "manual" (every turn goes to the engine of the conversation\'s first',
    ),
    ("top-k-zero", {"rollout": {"rollout_top_k": 0}}, "rollout", "rollout_top_k", "use -1 to disable top-k"),
    (
        "over-sampling",
        {"rollout": {"over_sampling_batch_size": 2}},
        "rollout",
        "over_sampling_batch_size",
        "must be >= rollout_batch_size (4)",
    ),
    (
        "partial-rollout-without-rounds",
        {"rollout": {"partial_rollout": True}},
        "rollout",
        "partial_rollout",
        "set over_sampling_batch_size (> rollout_batch_size) or a dynamic_sampling_filter_path",
    ),
    (
        "offpolicy-mask-without-partial-rollout",
        {"rollout": {"mask_offpolicy_in_partial_rollout": True, "over_sampling_batch_size": 8}},
        "rollout",
        "mask_offpolicy_in_partial_rollout",
        "set partial_rollout = true",
    ),
    (
        "async-colocated-gpus",
        {"run": {"train_async": True}, "cluster": {"mode": "colocate", "device": "cuda"}},
        "run",
        "train_async",
        'use [cluster] mode = "split"',
    ),
    ("eval-interval-alone", {"eval": {"eval_interval": 5}}, "eval", "eval_interval", "set eval_prompt_data"),
    (
        "eval-data-alone",
        {"eval": {"eval_prompt_data": {"gsm8k": "g.jsonl"}}},
        "eval",
        "eval_prompt_data",
        "set eval_interval",
    ),
    (
        "eval-data-suffix",
        {"eval": {"eval_interval": 5, "eval_prompt_data": {"g": "g.txt"}}},
        "eval",
        "eval_prompt_data",
        "must be a .jsonl or .parquet file",
    ),
    (
        "dynamic-batch",
        {"train": {"use_dynamic_batch_size": True}},
        "train",
        "use_dynamic_batch_size",
        "set max_tokens_per_gpu",
    ),
    ("kl-coef-unused", {"grpo": {"kl_loss_coef": 0.1}}, "grpo", "kl_loss_coef", "set use_kl_loss = true"),
    ("min-lr", {"optimizer": {"lr": 1e-6, "min_lr": 1e-5}}, "optimizer", "min_lr", "lower min_lr or raise lr"),
    ("fsdp-tp", {"perf": {"backend": "fsdp", "tp": 2}}, "perf", "tp", "set tp = 1"),
    ("fsdp-etp", {"perf": {"backend": "fsdp", "etp": 2}}, "perf", "etp", "remove etp"),
    ("sequence-parallel", {"perf": {"sequence_parallel": True}}, "perf", "sequence_parallel", "set tp > 1"),
    (
        "recompute-method",
        {"perf": {"recompute_method": "uniform"}},
        "perf",
        "recompute_method",
        'recompute_granularity = "full"',
    ),
    (
        "moe-allgather",
        {"perf": {"moe_token_dispatcher_type": "allgather"}},
        "perf",
        "moe_token_dispatcher_type",
        'refuses variable sequence lengths, which every RL batch has: use "alltoall"',
    ),
    (
        "moe-fsdp",
        {"perf": {"backend": "fsdp", "moe_aux_loss_coeff": 0.01}},
        "perf",
        "moe_aux_loss_coeff",
        'the fsdp backend trains the HF model as its config.json says: remove it, or set backend = "megatron"',
    ),
    (
        "moe-flex",
        {"perf": {"moe_token_dispatcher_type": "flex"}},
        "perf",
        "moe_token_dispatcher_type",
        'needs DeepEP, which miles does not install: use "alltoall"',
    ),
    (
        "recompute-layers",
        {"perf": {"recompute_granularity": "selective", "recompute_num_layers": 2}},
        "perf",
        "recompute_num_layers",
        'recompute_granularity = "full"',
    ),
    ("mem-syntax", {"cluster": {"mem_per_node": "lots"}}, "cluster", "mem_per_node", '"512G"'),
    ("slurm-time", {"slurm": {"time": "4 hours"}}, "slurm", "time", '"HH:MM:SS"'),
    (
        "signal-lead",
        {"slurm": {"time": "00:01:00", "signal_lead_time": 120}},
        "slurm",
        "signal_lead_time",
        "lower signal_lead_time or raise time",
    ),
    (
        "container-no-image",
        {"slurm": {"container_runtime": "pyxis"}},
        "slurm",
        "container_image",
        "set container_image",
    ),
    (
        "container-no-runtime",
        {"slurm": {"container_image": "x.sqsh"}},
        "slurm",
        "container_runtime",
        'container_runtime = "pyxis"',
    ),
    ("container-mount", {"slurm": {"container_mounts": ["/data"]}}, "slurm", "container_mounts", '"src:dst"'),
    ("env-name", {"slurm": {"env": {"NOT-A-NAME": "1"}}}, "slurm", "env", "not an environment variable name"),
    ("eps-clip-c-range", {"grpo": {"eps_clip_c": 1.0}}, "grpo", "eps_clip_c", "must be > 1.0, got the number 1.0"),
    ("top-p-range", {"rollout": {"rollout_top_p": 1.5}}, "rollout", "rollout_top_p", "must be > 0.0 and <= 1.0"),
    ("seed-range", {"run": {"seed": -1}}, "run", "seed", "must be >= 0, got the integer -1"),
    ("knob-range", {"train": {"global_batch_size": 0}}, "train", "global_batch_size", "must be > 0"),
]


@pytest.mark.parametrize(("changes", "table", "key", "fix"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rule(specs: SpecFiles, changes: dict[str, dict[str, Any]], table: str, key: str | None, fix: str) -> None:
    message, path, text = specs.error(changes)
    try:
        line = line_of(text, table, key)
    except AssertionError:  # the key is not written: the message points at its table
        line = line_of(text, table)
    where = f"[{table}] {key}" if key else f"[{table}]"
    expected_start = f"{path}:{line}: {where}: "
    assert expected_start in message, message
    assert fix in message, message
    assert message.count("\n") == 0, f"one rule broken, one line expected:\n{message}"


def test_base_spec_is_valid(specs: SpecFiles) -> None:
    path, _ = specs.write()
    spec = load_spec(path)
    assert spec.train.num_steps_per_rollout == 1
    assert spec.run.run_dir == "runs/t" and spec.ckpt.save == "runs/t/checkpoints"


def test_directories_keep_what_the_user_wrote(specs: SpecFiles) -> None:
    path, _ = specs.write({"run": {"run_dir": "/scratch/me/r1/"}, "ckpt": {"save": "/ckpt/r1"}})
    spec = load_spec(path)
    assert spec.run.run_dir == "/scratch/me/r1/" and spec.ckpt.save == "/ckpt/r1"
    path, _ = specs.write({"run": {"run_dir": "/scratch/me/r1/"}})
    assert load_spec(path).ckpt.save == "/scratch/me/r1/checkpoints"


def test_all_problems_are_reported_together(specs: SpecFiles) -> None:
    message, path, text = specs.error(
        {"run": {"seed": "1"}, "rollout": {"rollout_top_k": 0, "rollout_batch_sise": 4}, "perf": {"tp": 0}}
    )
    assert message.startswith("3 problems in the run spec:"), message
    assert f'{path}:{line_of(text, "run", "seed")}: [run] seed: expected an integer, got the string "1"' in message
    assert (
        f"{path}:{line_of(text, 'rollout', 'rollout_batch_sise')}: [rollout] rollout_batch_sise: unknown key" in message
    )
    assert f"{path}:{line_of(text, 'perf', 'tp')}: [perf] tp: must be > 0" in message
    # Cross-field rules run once the types are right, and then all of theirs are reported together too.
    message, _, _ = specs.error({"rollout": {"rollout_top_k": 0, "group_rm": True}, "train": {"global_batch_size": 3}})
    assert message.startswith("3 problems"), message
    assert (
        "rollout_top_k" in message and "group_rm" in message and "is not divisible by global_batch_size (3)" in message
    )


@pytest.mark.parametrize("value", ["INFINITE", "UNLIMITED", "unlimited"])
def test_unlimited_time_is_slurm_s_no_limit(specs: SpecFiles, value: str) -> None:
    # Slurm reads UNLIMITED and INFINITE (any case) as no time limit; no limit has no save signal to come too late.
    path, _ = specs.write({"slurm": {"time": value, "signal_lead_time": 600}})
    assert load_spec(path).slurm.time == value
