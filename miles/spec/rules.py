"""Cross-field rules of a spec: what no single field's type can say.

Only rules about the spec itself live here; rules about the layout on nodes
and GPUs (TP x PP x CP x DP = trainer GPUs, heads divisible by TP, ...) are the
planner's (``miles.plan``). Every rule reports through ``report(table, key,
message)`` and its message says what to change. The rules, in order:

* ``[run]``: exactly one of ``num_rollout`` / ``num_epoch``; ``name`` usable as a directory name.
* ``[model]``: exactly one of ``hf_checkpoint`` / ``builtin``; ``builtin`` names a built-in model
  (``miles.model.builtin``).
* ``[rollout]``: ``prompt_data`` set, a ``.jsonl`` or ``.parquet`` file; exactly one reward
  (``rm_type`` / ``custom_rm_path`` / ``rm_url``); custom code as ``module:function``;
  ``rm_url`` is http(s); ``group_rm`` needs ``custom_rm_path``; ``rollout_top_k`` is -1 or >= 1;
  ``over_sampling_batch_size`` >= ``rollout_batch_size``; ``partial_rollout`` needs over-sampling or a
  dynamic-sampling filter, ``mask_offpolicy_in_partial_rollout`` needs ``partial_rollout``.
* ``[eval]``: ``eval_interval`` and ``eval_prompt_data`` go together; eval data files are .jsonl/.parquet;
  ``eval_top_k`` is -1 or >= 1.
* ``[train]``: ``use_dynamic_batch_size`` needs ``max_tokens_per_gpu``.
* ``[grpo]``: ``kl_loss_coef`` > 0 needs ``use_kl_loss``; ``kl_coef`` needs a REINFORCE++ estimator and
  ``gamma`` ``reinforce_plus_plus`` (the estimators that read them).
* ``[optimizer]``: ``min_lr`` <= ``lr``.
* ``[perf]``: FSDP is data parallel only (tp = pp = cp = ep = 1, no etp); ``sequence_parallel`` needs tp > 1;
  ``recompute_method`` / ``recompute_num_layers`` need ``recompute_granularity = "full"``;
  ``moe_token_dispatcher_type`` is ``alltoall`` (allgather refuses variable lengths, flex needs DeepEP);
  the ``moe_*`` keys are Megatron's (refused with ``backend = "fsdp"``).
* ``[cluster]``: ``mem_per_node`` in Slurm's syntax; ``[run] train_async`` not on colocated GPUs that offload.
* ``[slurm]``: ``time`` in Slurm's syntax and longer than ``signal_lead_time``; a container runtime and
  an image go together; ``container_mounts`` are ``src:dst``; ``env`` names are shell variable names.
* keys of capabilities miles has not built yet are refused when set (:mod:`miles.spec.not_yet`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable

from miles.model.builtin import names
from miles.spec import not_yet
from miles.spec.tables import Spec
from miles.tools.toolbox import TOOL_NAMES

Report = Callable[[str, str, str], None]

_CODE_PATH = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*|[^:]+\.py):[A-Za-z_][A-Za-z0-9_]*\Z")
"""``package.module:function``, or ``path/to/file.py:function`` (looked up next to the spec too)."""
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
SLURM_MEM = re.compile(r"^[0-9]+[KMGT]?\Z")
"""Slurm's memory syntax (``0``, ``512G``, ``2000M``); the planner checks ``#SBATCH --mem`` with it too."""
_DATA_SUFFIXES = (".jsonl", ".parquet")


SLURM_TIME_SYNTAX = '"HH:MM:SS", "D-HH:MM:SS", minutes, or "UNLIMITED" for no limit'
"""How a Slurm time limit is written, for the messages that refuse one (the spec's and the planner's)."""


def slurm_time_seconds(text: str) -> int | None:
    """Seconds of a Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``); -1 for unlimited; None if
    invalid.

    The one statement of Slurm's time syntax in miles: the field rule below and the planner's check of the
    ``#SBATCH --time`` line both read it. Like Slurm, ``UNLIMITED`` and ``INFINITE`` in any case mean no limit.
    """
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return -1
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text, re.ASCII)
    if not m:
        return None
    days, a, b, c = m.groups()
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, mi, s = int(a), int(b or 0), int(c or 0)
        return int(days) * 86400 + h * 3600 + mi * 60 + s
    if c is not None:  # HH:MM:SS
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:  # MM:SS
        return int(a) * 60 + int(b)
    return int(a) * 60  # MM


def _code_path_fix(value: str) -> str:
    if ":" not in value and "." in value:
        module, _, func = value.rpartition(".")
        return f'; write "{module}:{func}"'
    return ""


def check(spec: Spec, report: Report) -> None:
    """Report every cross-field problem of ``spec`` (whose four knobs may still be unresolved)."""
    _run_and_model(spec, report)
    _rollout(spec, report)
    _eval(spec, report)
    _train_and_algo(spec, report)
    _perf(spec, report)
    _cluster_and_slurm(spec, report)
    not_yet.check(spec, report)


def _run_and_model(spec: Spec, report: Report) -> None:
    run = spec.run
    if (run.num_rollout is None) == (run.num_epoch is None):
        which = "both are set; keep one" if run.num_rollout is not None else "set one, e.g. num_rollout = 100"
        report(
            "run",
            "num_rollout" if run.num_rollout is not None else "",
            f"exactly one of num_rollout or num_epoch sets the run's length: {which}",
        )
    name = run.name
    if not name or name in (".", "..") or "/" in name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        report(
            "run",
            "name",
            f"{name!r} cannot name a run directory and a Slurm job: use letters, digits, '-', '_' and '.', without "
            "'/' or control characters",
        )
    m = spec.model
    if bool(m.hf_checkpoint) == bool(m.builtin):
        if m.hf_checkpoint:
            report("model", "builtin", "set either hf_checkpoint or builtin, not both: remove one of them")
        else:
            report(
                "model",
                "",
                'set the model: hf_checkpoint = "/path/to/hf-model-dir", or builtin = "<name>" for a tiny built-in '
                "model",
            )
    elif m.builtin:
        known = names()
        if m.builtin not in known:
            close = difflib.get_close_matches(m.builtin, known, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            report(
                "model", "builtin", f"unknown built-in model {m.builtin!r}: {hint}the built-ins are {', '.join(known)}"
            )


def _rollout(spec: Spec, report: Report) -> None:
    ro = spec.rollout
    if not ro.prompt_data:
        report(
            "rollout",
            "prompt_data",
            'the prompt dataset is required: prompt_data = "/path/to/prompts.jsonl" (or .parquet)',
        )
    elif not ro.prompt_data.endswith(_DATA_SUFFIXES):
        report("rollout", "prompt_data", f"{ro.prompt_data!r} must be a .jsonl or .parquet file")
    rewards = [k for k in ("rm_type", "custom_rm_path", "rm_url") if getattr(ro, k)]
    if not rewards:
        report(
            "rollout", "", 'set the reward: one of rm_type (e.g. "math"), custom_rm_path ("module:function") or rm_url'
        )
    elif len(rewards) > 1:
        report("rollout", rewards[1], f"set exactly one reward, found {' and '.join(rewards)}: remove all but one")
    code_keys = (
        "custom_rm_path",
        "dynamic_sampling_filter_path",
        "custom_generate_function_path",
        "rollout_function_path",
    )
    for key in code_keys:
        value = getattr(ro, key)
        if value and not _CODE_PATH.match(value):
            report(
                "rollout",
                key,
                f'{value!r} must name importable code as "module:function" (e.g. '
                f'"my_pkg.rewards:score"){_code_path_fix(value)}',
            )
    if ro.rm_url and not re.match(r"^https?://[^\s/]+", ro.rm_url):
        report(
            "rollout",
            "rm_url",
            f'{ro.rm_url!r} must be an http:// or https:// URL, e.g. "http://reward-host:8000/score"',
        )
    if ro.group_rm and not ro.custom_rm_path:
        report(
            "rollout",
            "group_rm",
            "group_rm scores whole groups with a custom reward: set custom_rm_path, or remove group_rm",
        )
    _generation(spec, report)
    if ro.rollout_top_k == 0:
        report("rollout", "rollout_top_k", "0 keeps no token: use -1 to disable top-k, or a value >= 1")
    rbs = ro.rollout_batch_size
    if ro.over_sampling_batch_size is not None and rbs is not None and ro.over_sampling_batch_size < rbs:
        report(
            "rollout",
            "over_sampling_batch_size",
            f"must be >= rollout_batch_size ({rbs}), got {ro.over_sampling_batch_size}: each round samples at least a "
            "full batch of prompts",
        )
    _partial(spec, report)


def _partial(spec: Spec, report: Report) -> None:
    """Partial rollouts continue the surplus that over-sampling aborts: without rounds there is none to keep, and
    the off-policy mask has ranges to mask only in a partial rollout."""
    ro = spec.rollout
    if ro.partial_rollout and ro.over_sampling_batch_size is None and not ro.dynamic_sampling_filter_path:
        report(
            "rollout",
            "partial_rollout",
            "keeps the requests over-sampling aborts once the batch is full, and without over_sampling_batch_size "
            "or dynamic_sampling_filter_path every request is trained on and none is aborted: set "
            "over_sampling_batch_size (> rollout_batch_size) or a dynamic_sampling_filter_path, or remove "
            "partial_rollout",
        )
    if ro.mask_offpolicy_in_partial_rollout and not ro.partial_rollout:
        report(
            "rollout",
            "mask_offpolicy_in_partial_rollout",
            "masks the token ranges a partial rollout continued from older weights, and partial_rollout is off: "
            "set partial_rollout = true, or remove mask_offpolicy_in_partial_rollout",
        )


def _generation(spec: Spec, report: Report) -> None:
    """Custom generation (docs/multi-turn.md): one of the two functions, turn limits within the total, known tools,
    and behind a router a policy that keeps a conversation's turns on the engine that caches its prefix."""
    ro = spec.rollout
    custom = ro.custom_generate_function_path or ro.rollout_function_path
    for key in ("over_sampling_batch_size", "dynamic_sampling_filter_path"):
        if custom and getattr(ro, key) not in (None, ""):
            report(
                "rollout",
                key,
                "dynamic sampling generates single-turn rounds and cannot run a custom generate or rollout function "
                "yet: remove it, or remove custom_generate_function_path / rollout_function_path",
            )
    if custom and spec.sglang.use_router and spec.sglang.router_policy != "manual":
        report(
            "sglang",
            "router_policy",
            f'"{spec.sglang.router_policy}" may send a turn of a conversation to another engine than its earlier '
            "turns, which then computes the whole conversation again; with a custom generate or rollout function use "
            '"manual" (every turn goes to the engine of the conversation\'s first, whose prefix cache holds it)',
        )
    if ro.custom_generate_function_path and ro.rollout_function_path:
        report(
            "rollout",
            "rollout_function_path",
            "set custom_generate_function_path (one sample at a time) or rollout_function_path (the whole rollout), "
            "not both: a rollout function calls whatever generation it wants itself",
        )
    per_turn = ro.generate_max_tokens_per_turn
    if per_turn is not None and per_turn > ro.rollout_max_response_len:
        report(
            "rollout",
            "generate_max_tokens_per_turn",
            f"{per_turn} exceeds rollout_max_response_len ({ro.rollout_max_response_len}), the limit of a whole "
            "response: lower it, or raise rollout_max_response_len",
        )
    unknown = [t for t in ro.generate_tools if t not in TOOL_NAMES]
    if unknown:
        report("rollout", "generate_tools", f"unknown tools {unknown}: the built-in tools are {list(TOOL_NAMES)}")
    if ro.generate_tool_call_parser == "bare" and not ro.generate_tools:
        report("rollout", "generate_tools", 'the "bare" tool-call parser calls the first tool: name at least one')


def _eval(spec: Spec, report: Report) -> None:
    ev = spec.eval
    if ev.eval_interval is not None and not ev.eval_prompt_data:
        report(
            "eval",
            "eval_interval",
            'evaluation needs data: set eval_prompt_data = { name = "/path/to/eval.jsonl" }, or remove eval_interval',
        )
    if ev.eval_prompt_data and ev.eval_interval is None:
        report(
            "eval",
            "eval_prompt_data",
            "no evaluation would run: set eval_interval (rollouts between evaluations), or remove eval_prompt_data",
        )
    if ev.eval_top_k == 0:
        report("eval", "eval_top_k", "0 keeps no token: use -1 to disable top-k, or a value >= 1")
    for name, path in ev.eval_prompt_data.items():
        if not path.endswith(_DATA_SUFFIXES):
            report("eval", "eval_prompt_data", f"dataset {name!r}: {path!r} must be a .jsonl or .parquet file")


def _train_and_algo(spec: Spec, report: Report) -> None:
    tr = spec.train
    if tr.use_dynamic_batch_size and tr.max_tokens_per_gpu is None:
        report(
            "train",
            "use_dynamic_batch_size",
            "dynamic batching packs micro-batches by tokens: set max_tokens_per_gpu (e.g. 16384)",
        )
    g = spec.grpo
    if g.kl_loss_coef > 0 and not g.use_kl_loss:
        report(
            "grpo",
            "kl_loss_coef",
            f"kl_loss_coef = {g.kl_loss_coef} has no effect without use_kl_loss = true: set use_kl_loss = true, or "
            "remove kl_loss_coef",
        )
    reinforce = g.advantage_estimator in ("reinforce_plus_plus", "reinforce_plus_plus_baseline")
    if g.kl_coef > 0 and not reinforce:
        report(
            "grpo",
            "kl_coef",
            f"kl_coef folds a KL penalty into the per-token rewards of the REINFORCE++ estimators; "
            f'advantage_estimator = "{g.advantage_estimator}" never reads it: use use_kl_loss = true with '
            'kl_loss_coef, or advantage_estimator = "reinforce_plus_plus"',
        )
    if g.gamma != 1.0 and g.advantage_estimator != "reinforce_plus_plus":
        report(
            "grpo",
            "gamma",
            f'gamma discounts the returns of advantage_estimator = "reinforce_plus_plus" only; '
            f'"{g.advantage_estimator}" never reads it: remove gamma, or change the estimator',
        )
    o = spec.optimizer
    if o.min_lr > o.lr:
        report("optimizer", "min_lr", f"min_lr ({o.min_lr}) must not exceed lr ({o.lr}): lower min_lr or raise lr")


def _perf(spec: Spec, report: Report) -> None:
    p = spec.perf
    if p.backend == "fsdp":
        for key in ("tp", "pp", "cp", "ep"):
            if getattr(p, key) != 1:
                report("perf", key, f'the fsdp backend is data parallel only: set {key} = 1, or backend = "megatron"')
        if p.etp is not None:
            report("perf", "etp", 'the fsdp backend is data parallel only: remove etp, or set backend = "megatron"')
    if p.sequence_parallel and p.tp == 1:
        report(
            "perf",
            "sequence_parallel",
            "sequence parallelism splits over the tensor-parallel group: set tp > 1, or remove sequence_parallel",
        )
    if p.backend == "fsdp":
        moe = [
            k
            for k, default in (
                ("moe_aux_loss_coeff", 0.0),
                ("moe_router_load_balancing_type", "none"),
                ("moe_router_dtype", None),
                ("moe_token_dispatcher_type", "alltoall"),
                ("moe_permute_fusion", False),
            )
            if getattr(p, k) != default
        ]
        for key in moe:
            report(
                "perf",
                key,
                f"{key} is a Megatron MoE option; the fsdp backend trains the HF model as its "
                'config.json says: remove it, or set backend = "megatron"',
            )
    if p.moe_token_dispatcher_type == "allgather":
        report(
            "perf",
            "moe_token_dispatcher_type",
            "Megatron's allgather dispatcher refuses variable sequence lengths, "
            'which every RL batch has: use "alltoall"',
        )
    elif p.moe_token_dispatcher_type == "flex":
        report(
            "perf",
            "moe_token_dispatcher_type",
            'the flex dispatcher needs DeepEP, which miles does not install: use "alltoall"',
        )
    for key in ("recompute_method", "recompute_num_layers"):
        if getattr(p, key) is not None and p.recompute_granularity != "full":
            report(
                "perf", key, f'{key} applies to full recomputation: set recompute_granularity = "full", or remove {key}'
            )


def _cluster_and_slurm(spec: Spec, report: Report) -> None:
    offloads = spec.perf.offload_train is not False or spec.perf.offload_rollout is not False
    if spec.run.train_async and spec.cluster.mode == "colocate" and spec.cluster.device != "cpu" and offloads:
        report(
            "run",
            "train_async",
            "async training overlaps generation with training, but colocated GPUs take turns (the actor offloads "
            'while the engines generate): use [cluster] mode = "split", or set [perf] offload_train = false and '
            "offload_rollout = false if both fit in GPU memory at once",
        )
    if not SLURM_MEM.match(spec.cluster.mem_per_node):
        report(
            "cluster",
            "mem_per_node",
            f"{spec.cluster.mem_per_node!r} is not Slurm memory syntax: use a number with an optional K/M/G/T suffix, "
            'e.g. "512G", or "0" for all',
        )
    sl = spec.slurm
    seconds = slurm_time_seconds(sl.time)
    if seconds is None:
        report(
            "slurm",
            "time",
            f'{sl.time!r} is not a Slurm time: use {SLURM_TIME_SYNTAX}, e.g. "04:00:00"',
        )
    elif 0 <= seconds <= sl.signal_lead_time:
        report(
            "slurm",
            "signal_lead_time",
            f"the save signal would come {sl.signal_lead_time} s before a time limit of {seconds} s: lower "
            "signal_lead_time or raise time",
        )
    if sl.container_runtime and not sl.container_image:
        report(
            "slurm",
            "container_image",
            f"container_runtime = {sl.container_runtime!r} needs an image: set container_image",
        )
    if sl.container_image and not sl.container_runtime:
        report(
            "slurm",
            "container_runtime",
            'container_image is set but no runtime: set container_runtime = "pyxis" or "apptainer"',
        )
    for mount in sl.container_mounts:
        src, sep, dst = mount.partition(":")
        if not (sep and src and dst):
            report("slurm", "container_mounts", f'{mount!r} must be "src:dst" (optionally "src:dst:ro")')
    for key in sl.env:
        if not _ENV_NAME.match(key):
            report(
                "slurm",
                "env",
                f"{key!r} is not an environment variable name: use letters, digits and '_', not starting with a digit",
            )
