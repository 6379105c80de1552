"""Every key a user can write does something, or is refused at load time.

Each field of every spec table (``miles.spec.tables.TABLES``) is in exactly one of:

* an observation group: a function of the spec that the program itself runs (the plan and sbatch script, each
  engine's command line, request bodies, narrow configs such as the loss's and the optimizer's, the data keys,
  the evaluation schedule, files a component writes), and for each key a value that changes what it returns;
* :data:`REFUSED`: keys of capabilities not built yet (:mod:`miles.spec.not_yet`), and keys whose every other
  value a rule refuses; setting one is exit 2 with the reason;
* :data:`SINGLE_CHOICE`: a closed choice of one value (nothing else loads).

Adding a field that is in none of them fails :func:`test_every_key_is_observed_or_refused`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from miles.algo.advantages import AdvantageInputs, compute_advantages
from miles.algo.loss import LossConfig, aggregation_for
from miles.ckpt.store import CheckpointStore
from miles.data.dataset import DataKeys, epoch_order
from miles.data.records import read_records
from miles.errors import UserError
from miles.plan import PlanError, make_plan, render_script, to_json
from miles.plan.engine_argv import plan_argvs, train_offload
from miles.preflight import check
from miles.rollout.client import sample_seed, sampling_params
from miles.rollout.fleet import weight_sync_kind
from miles.sample import Sample
from miles.session import checkpoint
from miles.session.components import num_rollouts
from miles.session.evaluation import EvalSettings, seed_namespace
from miles.spec import load_spec, not_yet
from miles.spec.fieldtypes import table_fields
from miles.spec.loader import spec_from_dict
from miles.spec.tables import TABLES, Spec
from miles.train.actor import ref_update_due, reference_dir
from miles.train.batch import RolloutBatch, collate, pack, plan_micro_batches, shard, shard_balanced, step_indices
from miles.train.optim import build_adamw, lr_at
from miles.transfer.bucket import buckets

ROOT = Path(__file__).resolve().parents[3]
Change = tuple[object, dict[str, object]]
"""A key's new value, and other keys set alike in both specs compared (the context the key acts in)."""


def _set(spec: Spec, changes: dict[str, object]) -> Spec:
    tables: dict[str, dict[str, object]] = {}
    for dotted, value in changes.items():
        table, key = dotted.split(".")
        tables.setdefault(table, {})[key] = value
    return dataclasses.replace(spec, **{t: dataclasses.replace(getattr(spec, t), **kv) for t, kv in tables.items()})  # type: ignore[arg-type]


# ---------------------------------------------------------------- observations


def _gpu_spec() -> Spec:
    spec = load_spec(ROOT / "configs" / "colocate-1node-qwen2.5-1.5b.toml")
    return _set(
        spec,
        {
            "perf.backend": "megatron",
            "model.num_layers": 4,
            "model.num_attention_heads": 8,
            "model.num_key_value_heads": 4,
            "slurm.container_runtime": "apptainer",
            "slurm.container_image": "/img/miles.sif",
        },
    )


def _plan(spec: Spec) -> str:
    """What ``miles submit`` writes and the job starts: the sbatch script, the plan, each engine's command."""
    try:
        plan = make_plan(spec)
        argvs = "\n".join(" ".join(a) for a in plan_argvs(spec, plan))
        return render_script(spec, plan) + to_json(plan) + argvs
    except (PlanError, UserError) as e:
        return f"refused: {e}"


def _requests(spec: Spec) -> list[dict[str, Any]]:
    """The sampling params of two training requests and one evaluation request."""
    ro, settings = spec.rollout, EvalSettings.from_spec(spec)
    out = [sampling_params(ro, sample_seed(ro.rollout_seed, 0, i)) for i in range(2)]
    out.append(sampling_params(ro, sample_seed(ro.rollout_seed, seed_namespace(0, 0, 1), 0), **settings.overrides))
    return out


def _evaluation(spec: Spec) -> tuple[Any, ...]:
    settings = EvalSettings.from_spec(spec)
    return (
        settings.datasets,
        settings.n_samples,
        [settings.due(s, 10) for s in range(11)],
        DataKeys.for_eval(spec.eval, spec.rollout),
    )


def _data(spec: Spec) -> tuple[Any, ...]:
    ro = spec.rollout
    records = read_records(ROOT / "configs" / ro.prompt_data, "rollout.prompt_data", limit=2)
    return DataKeys.for_rollout(ro), epoch_order(50, ro.rollout_seed, 1, ro.rollout_shuffle), records


def _reward(spec: Spec) -> dict[str, Any]:
    from miles.reward.model import RewardModel

    model = RewardModel.from_spec(spec.rollout, base_dir=ROOT)
    return {k: v for k, v in vars(model).items() if k != "config"} | {
        "per_sample": getattr(model.per_sample, "__name__", None),
        "per_group": getattr(model.per_group, "__name__", None),
    }


def _loss(spec: Spec) -> tuple[Any, ...]:
    return LossConfig.from_grpo(spec.grpo), aggregation_for(spec.grpo)


def _advantages(spec: Spec) -> list[list[float]]:
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 5, 2, 4]
    inputs = AdvantageInputs(
        rewards=torch.tensor([1.0, 0.0, 0.5, 1.0]),
        group_index=[0, 0, 1, 1],
        loss_masks=[torch.ones(n) for n in lengths],
        old_logprobs=[-torch.rand(n, generator=gen) for n in lengths],
        ref_logprobs=[-torch.rand(n, generator=gen) for n in lengths],
    )
    return [a.tolist() for a in compute_advantages(spec.grpo, inputs)]


def _old_logprobs(spec: Spec) -> list[list[float]] | None:
    """The old log-probs that :func:`miles.train.actor.prepare_batch` gives the loss (the actor's or the engine's)."""
    from miles.sample import Sample
    from miles.train.actor import ActorConfig, prepare_batch

    class Actor:
        def compute_logprobs(self, batch: Any, *, model: str = "actor") -> list[torch.Tensor]:
            return [torch.full((n,), -1.0) for n in batch.response_lens]

    samples = [
        Sample(
            group_index=i // 2,
            prompt_index=i // 2,
            prompt="p",
            prompt_text="p",
            prompt_ids=[1, 2],
            response_ids=[3, 4],
            response_logprobs=[-0.5, -0.25],
            reward=float(i % 2),
        )
        for i in range(4)
    ]
    spec = _set(spec, {"train.global_batch_size": 2, "train.num_steps_per_rollout": 2})
    batch = prepare_batch(Actor(), samples, ActorConfig.from_spec(spec))  # type: ignore[arg-type]
    return None if batch.old_logprobs is None else [lp.tolist() for lp in batch.old_logprobs]


def _optimizer(spec: Spec) -> tuple[Any, ...]:
    from miles.train.megatron.config import megatron_optimizer_config

    opt = spec.optimizer
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    adamw = build_adamw(opt, net.named_parameters())
    groups = [{k: v for k, v in g.items() if k != "params"} for g in adamw.param_groups]
    megatron = dataclasses.asdict(megatron_optimizer_config(opt, torch.float32, distributed=False))
    return [lr_at(opt, s, 100) for s in range(0, 101, 5)], groups, megatron


def _batches(spec: Spec) -> list[Any]:
    """Each step's micro-batches over two DP ranks, and their ``input_ids`` shapes in the layout ``qkv_format`` asks
    for (packed: FSDP always, Megatron where it can, ``packs_sequences``)."""
    ro, tr = spec.rollout, spec.train
    n = (ro.rollout_batch_size or 1) * (ro.n_samples_per_prompt or 1)
    lengths = [1 + (7 * i) % 13 for i in range(n)]
    batch = RolloutBatch.from_samples(
        [Sample(0, i, "", "", [1], response_ids=[2] * (k - 1)) for i, k in enumerate(lengths)]
    )
    layout = pack if tr.qkv_format == "thd" else collate
    out = []
    for idx in step_indices(n, tr.global_batch_size or n, tr.num_steps_per_rollout or 1):
        per_rank = shard_balanced(idx, 2, lengths) if tr.balance_data else shard(idx, 2)
        max_tokens = tr.max_tokens_per_gpu if tr.use_dynamic_batch_size else None
        plan = plan_micro_batches(
            per_rank, lengths, micro_batch_size=tr.micro_batch_size, max_tokens=max_tokens, packed=layout is pack
        )
        out.append((plan, [[tuple(layout(batch, mb).input_ids.shape) for mb in rank] for rank in plan]))
    return out


def _megatron(spec: Spec) -> str:
    pytest.importorskip("megatron.core")
    from miles.train.megatron.config import arch_from_dict, layer_spec, transformer_config
    from tests.unit.train.megatron.test_megatron_mapping import mesh_of

    arch = arch_from_dict(
        {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "hidden_size": 32,
            "intermediate_size": 64,
            "moe_intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "vocab_size": 96,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "max_position_embeddings": 64,
            "tie_word_embeddings": False,
        }
    )
    cfg = transformer_config(arch, mesh_of(spec.perf), spec.perf, dtype=torch.float32, use_te=False)
    layers = layer_spec(arch, False, spec.perf.attention_backend, spec.perf.fused_kernels)
    return repr(sorted((k, repr(v)) for k, v in vars(cfg).items())) + repr(layers)


def _checkpoints(spec: Spec) -> tuple[Any, ...]:
    return (
        [checkpoint.save_due(spec, r) for r in range(10)],
        CheckpointStore.of_run(spec.ckpt, "/run"),
        checkpoint.hf_export_dir(spec, 4),
        reference_dir(spec.ckpt.ref_load, "/initial-model"),
        [ref_update_due(spec.grpo, r) for r in range(10)],
        num_rollouts(spec, 1000),
    )


def _resume_check(spec: Spec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    report = check(spec, local_only=True, skip=("data", "model", "code"))
    return tuple(map(str, report.problems)), tuple(report.notes)


def _sync_and_offload(spec: Spec) -> tuple[Any, ...]:
    named = [(f"w{i}", torch.zeros(64, 64)) for i in range(4)]
    return (
        weight_sync_kind(spec, "cuda"),
        [len(b.names) for b in buckets(named, spec.rollout.update_weight_buffer_size)],
        train_offload(spec, gpu=True),
    )


def _wandb_init(spec: Spec) -> dict[str, Any]:
    """What a W&B run is opened with, but its config (the whole spec, which every key changes)."""
    from miles.session.wandb_sink import init_arguments

    return {k: v for k, v in init_arguments(spec, Path("/run"), "id").items() if k != "config"}


def _router(spec: Spec) -> list[str]:
    from miles.sglang.router import driver_router_launch

    return list(driver_router_launch(spec, 30000, "k", Path("/run"), "python").argv)


class _Files:
    """Observations that run a component on real files: each call gets a fresh directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = itertools.count()

    def fresh(self) -> Path:
        path = self.root / str(next(self.count))
        path.mkdir()
        return path

    def metrics(self, spec: Spec) -> list[str]:
        from miles.session.metrics import MetricsLog

        run_dir = self.fresh()
        log = MetricsLog.of_run(spec, run_dir, 0, None)  # use_wandb: a real W&B run, offline, under run_dir
        log.log(0, {"rollout/reward_mean": 0.5}, {"time/total": 1.0})
        log.close()
        return sorted(p.name for p in run_dir.iterdir())

    def engine_key(self, spec: Spec) -> bool:
        from miles.job import enginekey

        run_dir = self.fresh()
        enginekey.ensure(run_dir, spec)
        return enginekey.load(run_dir, spec) is not None

    def builtin_model(self, spec: Spec) -> str:
        from miles.job.rundir import model_dir_of

        model_dir = Path(model_dir_of(spec, self.fresh()))
        return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


def _base() -> Spec:
    return load_spec(ROOT / "configs" / "quickstart.toml")


class _Bytes:
    """A tokenizer of UTF-8 bytes (ids 0-255): every text round-trips, which a conversation's bookkeeping needs."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode(errors="replace")


class _ScriptedEngine:
    """Answers every model turn with a call of the run's first tool, in the run's call format, and records what
    each turn asked for. The conversation, tools and sandbox driven by it are miles' own."""

    def __init__(self, ro: Any) -> None:
        tool = (ro.generate_tools or ["calculator"])[0]
        arg = "2+3" if tool == "calculator" else "import time\ntime.sleep(0.5)\nprint(len(bytearray(64 * 2**20)))"
        if ro.generate_tool_call_parser == "hermes":
            name = "expression" if tool == "calculator" else "code"
            self.text = f"<tool_call>{json.dumps({'name': tool, 'arguments': {name: arg}})}</tool_call>"
        else:
            self.text = f"<tool_call>{arg}</tool_call>"
        self.asked: list[tuple[int, list[str]]] = []

    async def generate_turn(self, input_ids: list[int], params: dict[str, Any], session: str | None = None) -> Any:
        from miles.rollout.client import TurnOutput

        self.asked.append((params["max_new_tokens"], params["stop"]))
        ids = list(self.text.encode())[: params["max_new_tokens"]]
        finish = "stop" if len(ids) == len(self.text.encode()) else "length"
        return TurnOutput(ids, [0.0] * len(ids), bytes(ids).decode(errors="replace"), finish, 0, 0, "scripted")


def _tool_calc() -> Spec:
    spec = load_spec(ROOT / "configs" / "tool-calc.toml")
    return _set(spec, {"rollout.rollout_max_response_len": 4096, "rollout.generate_max_tokens_per_turn": None})


def _conversation(spec: Spec) -> tuple[Any, ...]:
    """Which generation hook the run loads, and one conversation of the built-in tool loop against a scripted
    engine: what each turn asked for, the turns, tool calls and failures, the tool answers in the response."""
    import asyncio

    from miles.rollout.custom import CustomGeneration
    from miles.rollout.generate import GenerateFnInput, GenerateState
    from miles.rollout.multi_turn import generate
    from miles.sample import Sample

    hook = CustomGeneration.from_spec(spec, _Bytes())
    engine = _ScriptedEngine(spec.rollout)
    state = GenerateState(engine, _Bytes(), spec.rollout, 0, 0)  # type: ignore[arg-type]
    sample = Sample(0, 0, "", "", list(b"question: "))
    params = sampling_params(spec.rollout, 7)
    out = asyncio.run(generate(GenerateFnInput(state, sample, params))).samples
    assert isinstance(out, Sample)
    return (
        (hook.name, hook.whole_rollout) if hook else None,
        engine.asked,
        (out.turns, out.tool_calls, out.tool_failures, out.tool_timeouts),
        out.response_text.replace(engine.text, ""),
        out.loss_mask,
    )


GROUPS: dict[str, tuple[Callable[[], Spec], str, dict[str, Change]]] = {
    "plan": (
        _gpu_spec,
        "_plan",
        {
            "run.name": ("other-run", {}),
            "run.run_dir": ("/elsewhere/run", {}),
            "model.hf_checkpoint": ("/shared/models/other", {}),
            "model.builtin": ("tiny-arith", {"model.hf_checkpoint": ""}),
            "model.dtype": ("float16", {}),
            "model.trust_remote_code": (True, {}),
            "model.num_layers": (3, {"perf.pp": 2}),
            "model.num_attention_heads": (6, {"perf.tp": 4}),
            "model.num_key_value_heads": (2, {"perf.tp": 4}),
            "model.num_experts": (6, {"perf.ep": 4}),
            "rollout.engine": ("embedded", {}),
            "rollout.rollout_seed": (7, {}),
            "perf.backend": ("fsdp", {}),
            "perf.tp": (2, {}),
            "perf.pp": (2, {}),
            "perf.cp": (2, {}),
            "perf.ep": (2, {"model.num_experts": 8}),
            "perf.etp": (2, {"model.num_experts": 8, "perf.ep": 2}),
            "perf.offload_rollout": (False, {}),
            "sglang.rollout_num_gpus_per_engine": (2, {}),
            "sglang.mem_fraction_static": (0.5, {}),
            "sglang.server_args": ({"chunked_prefill_size": 512}, {}),
            "cluster.mode": ("split", {"cluster.rollout_num_gpus": 8, "cluster.rollout_num_nodes": 1}),
            "cluster.gpus_per_node": (0, {}),
            "cluster.actor_num_nodes": (2, {}),
            "cluster.actor_num_gpus_per_node": (4, {}),
            "cluster.rollout_num_nodes": (2, {"cluster.mode": "split", "cluster.rollout_num_gpus": 8}),
            "cluster.rollout_num_gpus": (4, {"cluster.mode": "split", "cluster.rollout_num_nodes": 1}),
            "cluster.cpus_per_node": (32, {}),
            "cluster.mem_per_node": ("512G", {}),
            "cluster.device": ("cpu", {}),
            "slurm.partition": ("other", {}),
            "slurm.rollout_partition": (
                "engines",
                {"cluster.mode": "split", "cluster.rollout_num_gpus": 8, "cluster.rollout_num_nodes": 1},
            ),
            "slurm.account": ("acct", {}),
            "slurm.qos": ("high", {}),
            "slurm.time": ("01:00:00", {}),
            "slurm.constraint": ("h100", {}),
            "slurm.reservation": ("res", {}),
            "slurm.exclusive": (False, {}),
            "slurm.gpu_request": ("gres", {}),
            "slurm.container_runtime": ("pyxis", {}),
            "slurm.container_image": ("/img/other.sif", {}),
            "slurm.container_mounts": (["/data:/data"], {}),
            "slurm.modules": (["cuda/12.4"], {}),
            "slurm.setup": (["echo site"], {}),
            "slurm.env": ({"NCCL_DEBUG": "INFO"}, {}),
            "slurm.signal_lead_time": (200, {}),
            "slurm.max_requeues": (1, {}),
            "slurm.python": ("/opt/miles/bin/python", {}),
        },
    ),
    "requests": (
        _base,
        "_requests",
        {
            "rollout.rollout_temperature": (0.5, {}),
            "rollout.rollout_top_p": (0.9, {}),
            "rollout.rollout_top_k": (5, {}),
            "rollout.rollout_max_response_len": (7, {}),
            "rollout.rollout_stop": (["\n"], {}),
            "rollout.rollout_stop_token_ids": ([3], {}),
            "eval.eval_temperature": (0.0, {}),
            "eval.eval_top_p": (0.5, {}),
            "eval.eval_top_k": (1, {}),
            "eval.eval_max_response_len": (9, {}),
        },
    ),
    "evaluation": (
        _base,
        "_evaluation",
        {
            "eval.eval_prompt_data": ({"a": "a.jsonl"}, {"eval.eval_interval": 2}),
            "eval.eval_interval": (3, {"eval.eval_prompt_data": {"a": "a.jsonl"}}),
            "eval.n_samples_per_eval_prompt": (4, {}),
            "eval.skip_eval_before_train": (
                True,
                {"eval.eval_prompt_data": {"a": "a.jsonl"}, "eval.eval_interval": 2},
            ),
            "eval.eval_input_key": ("question", {}),
            "eval.eval_label_key": ("answer", {}),
        },
    ),
    "data": (
        _base,
        "_data",
        {
            "rollout.prompt_data": ("data/arith.jsonl", {}),
            "rollout.input_key": ("question", {}),
            "rollout.label_key": ("answer", {}),
            "rollout.metadata_key": ("meta", {}),
            "rollout.apply_chat_template": (True, {}),
            "rollout.apply_chat_template_kwargs": ({"enable_thinking": False}, {}),
            "rollout.rollout_shuffle": (False, {}),
            "rollout.rollout_max_prompt_len": (10, {}),
        },
    ),
    "reward": (
        _base,
        "_reward",
        {
            "rollout.rm_type": ("math", {}),
            "rollout.custom_rm_path": ("tests.unit.spec.key_effect_rewards:score", {"rollout.rm_type": ""}),
            "rollout.group_rm": (
                True,
                {"rollout.rm_type": "", "rollout.custom_rm_path": "tests.unit.spec.key_effect_rewards:score"},
            ),
            "rollout.rm_url": ("http://reward-host:8000/score", {"rollout.rm_type": ""}),
            "rollout.reward_key": ("score", {}),
            "rollout.rm_timeout": (5.0, {}),
            "rollout.rm_concurrency": (3, {}),
        },
    ),
    "loss": (
        _base,
        "_loss",
        {
            "grpo.use_kl_loss": (False, {}),
            "grpo.kl_loss_coef": (0.1, {}),
            "grpo.kl_loss_type": ("k3", {}),
            "grpo.eps_clip": (0.3, {}),
            "grpo.eps_clip_high": (0.4, {}),
            "grpo.eps_clip_c": (3.0, {}),
            "grpo.entropy_coef": (0.01, {}),
            "grpo.calculate_per_token_loss": (True, {}),
            "grpo.use_tis": (True, {}),
            "grpo.tis_clip": (3.0, {"grpo.use_tis": True}),
        },
    ),
    "old log-probs": (_base, "_old_logprobs", {"grpo.use_rollout_logprobs": (True, {})}),
    "advantages": (
        _base,
        "_advantages",
        {
            "grpo.advantage_estimator": ("reinforce_plus_plus", {}),
            "grpo.normalize_advantages": (True, {}),
            "grpo.disable_grpo_std_normalization": (True, {}),
            "grpo.gamma": (0.5, {"grpo.advantage_estimator": "reinforce_plus_plus"}),
            "grpo.kl_coef": (0.1, {"grpo.advantage_estimator": "reinforce_plus_plus"}),
        },
    ),
    "optimizer": (
        _base,
        "_optimizer",
        {
            "optimizer.lr": (1e-4, {}),
            "optimizer.min_lr": (1e-5, {"optimizer.lr_decay_style": "cosine"}),
            "optimizer.lr_decay_style": ("linear", {}),
            "optimizer.lr_warmup_iters": (10, {}),
            "optimizer.lr_decay_iters": (50, {"optimizer.lr_decay_style": "linear"}),
            "optimizer.weight_decay": (0.1, {}),
            "optimizer.adam_beta1": (0.8, {}),
            "optimizer.adam_beta2": (0.95, {}),
            "optimizer.adam_eps": (1e-6, {}),
            "optimizer.clip_grad": (0.5, {}),
        },
    ),
    "batches": (
        _base,
        "_batches",
        {
            "rollout.rollout_batch_size": (32, {}),
            "rollout.n_samples_per_prompt": (4, {}),
            "train.global_batch_size": (256, {}),
            "train.num_steps_per_rollout": (2, {"train.global_batch_size": 256}),
            "train.micro_batch_size": (64, {}),
            "train.use_dynamic_batch_size": (True, {"train.max_tokens_per_gpu": 100}),
            "train.max_tokens_per_gpu": (50, {"train.use_dynamic_batch_size": True}),
            "train.balance_data": (True, {}),
            "train.qkv_format": ("bshd", {"train.use_dynamic_batch_size": True, "train.max_tokens_per_gpu": 100}),
        },
    ),
    "megatron": (
        _base,
        "_megatron",
        {
            "perf.sequence_parallel": (True, {"perf.tp": 2}),
            "perf.attention_backend": ("unfused", {}),
            "perf.fused_kernels": (False, {}),
            "perf.recompute_granularity": ("full", {}),
            "perf.recompute_method": ("block", {"perf.recompute_granularity": "full"}),
            "perf.recompute_num_layers": (2, {"perf.recompute_granularity": "full"}),
            "perf.moe_aux_loss_coeff": (0.01, {"perf.moe_router_load_balancing_type": "aux_loss"}),
            "perf.moe_router_load_balancing_type": ("aux_loss", {}),
            "perf.moe_router_dtype": ("fp32", {}),
            "perf.moe_permute_fusion": (True, {}),
        },
    ),
    "checkpoints": (
        _base,
        "_checkpoints",
        {
            "ckpt.save_interval": (3, {}),
            "ckpt.save": ("/ckpts", {}),
            "ckpt.keep_last": (5, {}),
            "ckpt.save_hf": ("/hf/{rollout_id}", {}),
            "ckpt.ref_load": ("/ref-model", {}),
            "grpo.ref_update_interval": (2, {}),
            "run.num_rollout": (7, {}),
            "run.num_epoch": (2, {"run.num_rollout": None, "run.num_epoch": 1}),
        },
    ),
    "resume check": (_base, "_resume_check", {"ckpt.load": ("/nonexistent/checkpoints", {})}),
    "sync and offload": (
        _base,
        "_sync_and_offload",
        {
            "rollout.weight_sync": ("distributed", {}),
            "rollout.update_weight_buffer_size": (16384, {}),
            "perf.offload_train": (False, {}),
        },
    ),
    "router": (_base, "_router", {"sglang.router_policy": ("round_robin", {})}),
    "multi-turn": (
        _tool_calc,
        "_conversation",
        {
            "rollout.rollout_function_path": ("", {}),
            "rollout.custom_generate_function_path": (
                "miles.rollout.multi_turn:generate",
                {"rollout.rollout_function_path": ""},
            ),
            "rollout.generate_max_turns": (3, {}),
            "rollout.generate_max_tokens_per_turn": (16, {}),
            "rollout.generate_tool_call_parser": ("hermes", {}),
            "rollout.generate_tools": (["python"], {}),
            "rollout.generate_tool_timeout": (0.2, {"rollout.generate_tools": ["python"]}),
            "rollout.generate_tool_memory_mb": (48, {"rollout.generate_tools": ["python"]}),
        },
    ),
    "metrics files": (
        _base,
        "metrics",
        {"run.use_tensorboard": (False, {}), "run.plot": (False, {}), "run.use_wandb": (True, {})},
    ),
    "wandb": (
        _base,
        "_wandb_init",
        {
            "run.wandb_mode": ("online", {}),
            "run.wandb_project": ("miles-grpo", {}),
            "run.wandb_team": ("my-team", {}),
            "run.wandb_group": ("ablation-kl", {}),
            "run.wandb_tags": (["cpu", "quickstart"], {}),
        },
    ),
    "engine key": (_base, "engine_key", {"rollout.engine_auth": (False, {})}),
    "built-in model": (_base, "builtin_model", {"run.seed": (99, {})}),
}
"""Observation group -> (base spec, observation, key -> change). A name starting with ``_`` is a module function;
others are methods of :class:`_Files`."""

RUN_OBSERVED: dict[str, str] = {
    "ckpt.no_save_optim": "tests/unit/train/test_fsdp.py::test_no_save_optim_restores_weights_and_step_only",
    "rollout.check_weight_sync": "tests/unit/test_loop_learns.py::"
    "test_quickstart_reward_rises_and_engines_hold_the_actors_weights",
    "rollout.over_sampling_batch_size": "tests/unit/rollout/test_oversample.py::"
    "test_over_sampling_aborts_the_surplus_on_the_engine",
    "rollout.dynamic_sampling_filter_path": "tests/unit/test_loop_resume.py::"
    "test_interrupted_run_matches_the_straight_one",
    "rollout.partial_rollout": "tests/unit/rollout/test_partial.py::"
    "test_aborted_surplus_is_kept_and_taken_first_next_rollout",
    "rollout.mask_offpolicy_in_partial_rollout": "tests/unit/rollout/test_partial.py::"
    "test_a_cut_surplus_sample_is_continued_next_rollout_with_its_tokens_versions_and_mask",
    "run.train_async": "tests/unit/test_loop_resume.py::test_interrupted_multi_turn_async_run_matches_the_straight_one",
    "sglang.use_router": "tests/sglang/test_sglang_server.py::"
    "test_rollouts_through_the_router_survive_a_killed_engine_that_rejoins_after_a_sync",
}
"""Keys whose effect is a whole training step or run, observed by the run-based test named (no cheaper function
shows it); the Megatron side of ``no_save_optim`` is in tests/unit/train/megatron/test_megatron_actor.py."""

REFUSED_BY_RULE: dict[str, tuple[object, str]] = {
    "perf.moe_token_dispatcher_type": ("allgather", "refuses variable sequence lengths"),
}
"""Keys whose every value but the default is refused by a rule (the value shown, the reason's words)."""

SINGLE_CHOICE = {"optimizer.optimizer"}
"""``Literal`` keys of one value: any other value is refused by the loader's type check."""


def _all_keys() -> set[str]:
    return {f"{t}.{k}" for t, cls in TABLES.items() for k in table_fields(cls)}


def _refused_not_yet() -> set[str]:
    return {f"{t}.{k}" for t, k in not_yet.refused_keys()}


def test_every_key_is_observed_or_refused() -> None:
    observed = [k for _, _, changes in GROUPS.values() for k in changes]
    assert len(observed) == len(set(observed)), "a key is observed twice"
    parts = [set(observed), set(RUN_OBSERVED), set(REFUSED_BY_RULE), _refused_not_yet(), SINGLE_CHOICE]
    for a, b in itertools.combinations(parts, 2):
        assert not a & b, a & b
    covered = set().union(*parts)
    missing = sorted(_all_keys() - covered)
    assert not missing, (
        f"keys with no observed effect and no refusal: {missing}; add an observation to GROUPS in "
        "tests/unit/spec/test_key_effects.py, or refuse the key in miles/spec/not_yet.py"
    )
    assert not covered - _all_keys(), sorted(covered - _all_keys())


def _outcome(observe: Callable[[Spec], Any], spec: Spec) -> Any:
    """What ``observe`` returns, or the refusal it raises (a refusal is what the program does, too)."""
    try:
        return observe(spec)
    except (UserError, ValueError, ImportError) as e:
        return f"refused: {type(e).__name__}: {e}"


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_each_key_changes_what_the_program_does(group: str, tmp_path: Path) -> None:
    base_of, name, changes = GROUPS[group]
    observe: Callable[[Spec], Any] = getattr(_Files(tmp_path), name) if not name.startswith("_") else globals()[name]
    base = base_of()
    silent = []
    for key, (value, context) in changes.items():
        table, field = key.split(".")
        before = _set(base, context)
        after = _set(before, {key: value})
        assert getattr(before, table) != getattr(after, table), f"{key}: the context already sets {value!r}"
        if _outcome(observe, before) == _outcome(observe, after):
            silent.append(key)
    assert not silent, f"{group}: setting these keys changed nothing observed: {silent}"


@pytest.mark.parametrize("key", sorted(RUN_OBSERVED))
def test_run_observed_keys_name_a_test_that_sets_them(key: str) -> None:
    path, test = RUN_OBSERVED[key].split("::")
    source = (ROOT / path).read_text()
    assert f"def {test}(" in source
    assert key.split(".")[1] in source


def _spec_data(quickstart: dict[str, Any], key: str, value: object) -> dict[str, Any]:
    data = json.loads(json.dumps(quickstart))
    table, field = key.split(".")
    data.setdefault(table, {})[field] = value
    return data


@pytest.fixture(scope="module")
def quickstart() -> dict[str, Any]:
    import tomllib

    data = tomllib.loads((ROOT / "configs" / "quickstart.toml").read_text())
    data["rollout"]["prompt_data"] = str(ROOT / "configs" / "data" / "majority-digit.jsonl")
    return data


def _other_value(key: str) -> object:
    table, field = key.split(".")
    tp, f = table_fields(TABLES[table])[field]
    default = getattr(TABLES[table](), field)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return next(a for a in args if a != default)
    if tp is bool or bool in args:
        return not default
    if int in args or tp is int:
        return 64
    if str in args or tp is str:
        return "my_pkg.module:function" if field.endswith("_path") else "value"
    raise AssertionError(f"{key}: no test value for {tp}")


def test_keys_of_capabilities_not_built_are_refused_with_exit_2(
    quickstart: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each key of :data:`miles.spec.not_yet.NOT_YET`, and the refusal itself on a capability entered there."""
    monkeypatch.setitem(not_yet.NOT_YET, "a capability", {("run", "plot"): "remove it"})
    for key in sorted(_refused_not_yet()):
        with pytest.raises(UserError) as e:
            spec_from_dict(_spec_data(quickstart, key, _other_value(key)))
        assert e.value.exit_code == 2
        assert f"{key.split('.')[1]}: miles does not support" in str(e.value) and "yet" in str(e.value)


@pytest.mark.parametrize("key", sorted(REFUSED_BY_RULE))
def test_keys_refused_by_a_rule_exit_2(key: str, quickstart: dict[str, Any]) -> None:
    value, words = REFUSED_BY_RULE[key]
    with pytest.raises(UserError) as e:
        spec_from_dict(_spec_data(quickstart, key, value))
    assert e.value.exit_code == 2 and words in str(e.value)
