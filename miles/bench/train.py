"""``miles bench train``: actor tokens/s and MFU for each training backend.

The actor is the one the loop uses (:func:`miles.train.actor.build_actor`: FSDP2
or Megatron-core), on a model of real shape with random weights, trained with
the real GRPO step (``actor.train`` on a :class:`RolloutBatch` of ``--batch``
sequences of ``--seq-len`` tokens, advantages from :mod:`miles.algo`). A step's
model FLOPs come from the HF config (:func:`miles.bench.shapes.train_flops_per_token`);
MFU divides the achieved FLOP/s by the card's dense peak (``--peak-tflops`` or
the table in :mod:`miles.bench.hardware`). As a same-run reference the suite
also measures plain square matmuls in the training dtype on the same device,
so ``of_matmul`` says how close training is to what this device did just now.

``--variant`` measures several settings of one backend in the same run (each
a row): ``default``, or comma-separated ``key=value`` overrides of ``[perf]``
fields plus ``micro_batch`` and ``qkv_format``, e.g.
``attention_backend=sdpa,fused_kernels=true,micro_batch=4``. Without
``micro_batch`` (or ``--micro-batch``) micro-batches are formed by the token
budget ``--max-tokens-per-gpu``, as ``[train] use_dynamic_batch_size`` does.

Sequence lengths: ``--lengths fixed`` gives every sequence ``--seq-len``
tokens; ``--lengths rl`` draws response lengths from an RL-like skewed mix
(:func:`rl_response_lengths`: most responses short, a share cut at the limit),
where padding wastes most of a padded micro-batch. ``--variant
qkv_format=bshd qkv_format=thd`` then compares padded against packed
micro-batches in one run. ``tokens_per_s`` counts real tokens only (the
padding a layout adds is work, not output), and the model FLOPs are those of
each sequence at its own length.

What a timed step contains: everything ``actor.train`` does for one optimizer
step (planning and collating the micro-batches on the host, copying them to
the device, forward, loss, backward, gradient reduction, the optimizer step
with clipping, metric reduction), between two device synchronisations. The
FLOPs counted are the model's only (no recomputation): MFU, not HFU.

Multi-GPU: start it under ``torchrun --nproc-per-node N -m miles.cli bench train ...``
(or ``srun``); one process per GPU, rank 0 reports.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from miles.algo.advantages import AdvantageInputs, compute_advantages
from miles.bench.hardware import measured_matmul_tflops, peak_tflops, synchronize
from miles.bench.report import Report, machine
from miles.bench.shapes import PRESETS, hf_config, load_config_dict, param_count, train_flops_per_token, with_layers
from miles.errors import UserError
from miles.job.ports import free_port
from miles.plan import trainer_mesh
from miles.sample import Sample
from miles.spec.tables import GrpoConfig, ModelConfig, OptimizerConfig, PerfConfig, RolloutConfig, Spec, TrainConfig
from miles.train.actor import ActorConfig, TrainerContext
from miles.train.backends import build_actor
from miles.train.batch import RolloutBatch


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="miles bench train", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--config", help="HF config.json (or its directory) of the model")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a known model shape instead of --config")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument(
        "--backend",
        nargs="+",
        choices=["fsdp", "megatron"],
        default=["fsdp"],
        help="training backends to measure (default fsdp)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype (default bfloat16 on GPUs, float32 on CPUs)",
    )
    p.add_argument(
        "--seq-len", type=int, default=2048, help="tokens per sequence (prompt + response); the limit with --lengths rl"
    )
    p.add_argument(
        "--lengths",
        choices=["fixed", "rl"],
        default="fixed",
        help="fixed: every sequence --seq-len tokens; rl: responses drawn from a skewed RL length mix up to the limit",
    )
    p.add_argument("--batch", type=int, default=8, help="sequences per optimizer step (global batch)")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="sequences per forward/backward (default: micro-batches by the token budget --max-tokens-per-gpu)",
    )
    p.add_argument(
        "--max-tokens-per-gpu",
        type=int,
        default=8192,
        help="token budget of one micro-batch when --micro-batch is not given (default 8192: 4 sequences at 2048; "
        "padded micro-batches count count x longest, packed ones the sum of lengths)",
    )
    p.add_argument(
        "--variant",
        nargs="+",
        default=["default"],
        help="settings to measure per backend: 'default' or key=value[,key=value] over [perf] fields, "
        "micro_batch and qkv_format (e.g. attention_backend=sdpa,fused_kernels=true,micro_batch=4; "
        "qkv_format=bshd qkv_format=thd compares padded with packed micro-batches)",
    )
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="peak dense TFLOP/s per device (default: card table)"
    )
    p.add_argument("--device", default=None, help="default cuda:<LOCAL_RANK> if CUDA is available, else cpu")
    p.add_argument("--workdir", default=None, help="where to write the random model (shared by all ranks)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON to this file")
    return p


def _init_dist(device: str) -> bool:
    """Join (or form, alone) the trainers' process group; True when this call created it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend)
        return True

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    return True


TRAIN_KEYS = {"qkv_format": ("thd", "bshd")}
"""``[train]`` keys a variant may set, with their values."""


def parse_variant(text: str) -> tuple[dict[str, Any], int | None, dict[str, Any]]:
    """``default`` or ``key=value,...`` -> ([perf] overrides, micro-batch override, [train] overrides); unknown keys
    are a UserError."""
    import dataclasses

    if text == "default":
        return {}, None, {}
    fields = {f.name: f for f in dataclasses.fields(PerfConfig)}
    perf: dict[str, Any] = {}
    train: dict[str, Any] = {}
    micro: int | None = None
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or (key not in fields and key != "micro_batch" and key not in TRAIN_KEYS) or key == "backend":
            raise UserError(
                f"--variant {text!r}: {item!r} is not key=value over [perf] fields, micro_batch or qkv_format "
                f"(known: {', '.join(sorted(k for k in fields if k != 'backend'))}, micro_batch, qkv_format)"
            )
        if key in TRAIN_KEYS:
            if raw not in TRAIN_KEYS[key]:
                raise UserError(f"--variant {text!r}: {key} must be one of {', '.join(TRAIN_KEYS[key])}")
            train[key] = raw
            continue
        value: Any = {"true": True, "false": False}.get(raw.lower(), raw)
        if isinstance(value, str) and value.lstrip("-").isdigit():
            value = int(value)
        if key == "micro_batch":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"--variant {text!r}: micro_batch must be an integer >= 1")
            micro = value
        else:
            perf[key] = value
    return perf, micro, train


def write_random_model(data: dict[str, Any], out: Path, seed: int = 0, device: str = "cpu") -> Path:
    """Save a randomly initialised model of shape ``data`` as an HF directory (what the actors load).

    Saved in bfloat16 (half the disk and time of fp32); the actors cast to their own dtypes when loading.
    Initialised on ``device`` (a GPU draws a billion random weights in a fraction of the CPU's time).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(data), dtype=torch.bfloat16)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, out)
    return out


RL_TRUNCATED = 0.15
"""Share of responses cut at the length limit in :func:`rl_response_lengths`."""
RL_SHORTEST = 4


def rl_response_lengths(n: int, limit: int, seed: int) -> list[int]:
    """``n`` response lengths of an RL rollout: a share :data:`RL_TRUNCATED` cut at ``limit``, the rest
    ``RL_SHORTEST + (limit - RL_SHORTEST) * u**3`` for uniform ``u`` (skewed short: the median is an eighth of the
    limit), about 0.36 x ``limit`` on average; a fixed function of ``seed``."""
    rng = random.Random(seed)
    shortest = min(RL_SHORTEST, limit)
    return [
        limit if rng.random() < RL_TRUNCATED else shortest + int((limit - shortest) * rng.random() ** 3)
        for _ in range(n)
    ]


def synthetic_batch(
    vocab: int, batch: int, seq_len: int, seed: int, grpo: Any, response_lens: list[int] | None = None
) -> Any:
    """A scored rollout of ``batch`` sequences (short prompt, then a response of ``response_lens[i]`` tokens or up to
    ``seq_len`` in all), advantages set."""

    rng = random.Random(seed)
    prompt = max(1, min(16, seq_len // 4))
    samples = []
    for i in range(batch):
        n = seq_len if response_lens is None else prompt + max(1, min(response_lens[i], seq_len - prompt))
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        samples.append(
            Sample(
                group_index=i // 4,
                prompt_index=i // 4,
                prompt="",
                prompt_text="",
                prompt_ids=ids[:prompt],
                response_ids=ids[prompt:],
                response_logprobs=[-1.0] * (n - prompt),
                reward=float(rng.random() < 0.5),
            )
        )
    rb = RolloutBatch.from_samples(samples)
    rb.advantages = compute_advantages(
        grpo, AdvantageInputs(rewards=rb.rewards, group_index=rb.group_index, loss_masks=rb.loss_masks)
    )
    return rb


def measure_backend(
    a: argparse.Namespace,
    backend: str,
    data: dict[str, Any],
    model_dir: str,
    device: str,
    dtype: str,
    variant: str = "default",
) -> dict[str, Any]:
    import gc

    import torch
    import torch.distributed as dist

    perf_over, micro, train_over = parse_variant(variant)
    micro = micro or a.micro_batch
    # Without a micro-batch size, micro-batches fill the token budget (padded: count x longest; packed: the sum).
    budget = {"use_dynamic_batch_size": True, "max_tokens_per_gpu": a.max_tokens_per_gpu} if micro is None else {}
    spec = Spec(
        model=ModelConfig(dtype=dtype),  # type: ignore[arg-type]  # checked by argparse choices
        rollout=RolloutConfig(rollout_max_response_len=a.seq_len),
        train=TrainConfig(
            global_batch_size=a.batch,
            num_steps_per_rollout=1,
            micro_batch_size=micro or 1,
            **budget,
            **train_over,
        ),
        perf=PerfConfig(backend=backend, **perf_over),  # type: ignore[arg-type]
        optimizer=OptimizerConfig(lr=1e-6),
        grpo=GrpoConfig(use_kl_loss=False),
    )
    total = a.warmup + a.steps
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    try:
        mesh = trainer_mesh(spec, dist.get_world_size(), model_dir)
        ctx = TrainerContext(model_dir=model_dir, num_rollout=total, device=torch.device(device), mesh=mesh)
        actor = build_actor(ActorConfig.from_spec(spec), ctx)
    except ImportError as e:
        raise UserError(
            f"--backend {backend}: its package is not installed here ({e}); "
            "megatron needs the `megatron` extra on a GPU machine"
        ) from e
    lengths = rl_response_lengths(a.batch, a.seq_len, seed=0) if a.lengths == "rl" else None
    batch = synthetic_batch(int(data["vocab_size"]), a.batch, a.seq_len, seed=0, grpo=spec.grpo, response_lens=lengths)
    times = []
    for step in range(total):
        synchronize(device)
        t0 = time.perf_counter()
        actor.train(batch, rollout_id=step)
        synchronize(device)
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated(torch.device(device)) / (1 << 30) if device.startswith("cuda") else None
    del actor
    gc.collect()  # the actor's module/optimizer graph has cycles: free it before the next variant builds its own
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    world = dist.get_world_size()
    step_s = sum(times) / len(times)
    seq_lens = [batch.seq_len(i) for i in range(len(batch))]
    tokens = sum(seq_lens)  # real tokens: the padding a layout adds is not output
    flops = sum(train_flops_per_token(data, n) * n for n in seq_lens)
    tflops = flops / step_s / 1e12
    return {
        "backend": backend,
        "variant": variant,
        "qkv_format": spec.train.qkv_format,
        "micro_batch": micro,
        "world": world,
        "step_s": step_s,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step_s,
        "tokens_per_s_per_device": tokens / step_s / world,
        "tflops_per_device": tflops / world,
        "max_mem_gib": mem,
        "packed_kernel": packed_kernel(data, device, dtype) if spec.train.qkv_format == "thd" else None,
    }


def packed_kernel(data: dict[str, Any], device: str, dtype: str) -> str:
    """The document-attention kernel a packed row of this model runs on ``device`` in ``dtype`` (what
    :func:`miles.train.document_attention.choose_kernel` picks for its query heads)."""
    import torch

    from miles.train.document_attention import choose_kernel

    head_dim = data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"]
    probe = torch.empty(1, 1, head_dim, dtype=getattr(torch, dtype), device=device)
    return choose_kernel(probe)


def packing_speedups(rows: list[dict[str, Any]]) -> dict[str, float]:
    """``packed_speedup_<backend>``: real tokens/s of its ``qkv_format=thd`` row over its ``qkv_format=bshd`` row,
    for each backend measured both ways (the first such rows)."""
    out: dict[str, float] = {}
    for backend in dict.fromkeys(r["backend"] for r in rows):
        by: dict[str, dict[str, Any]] = {}
        for r in rows:
            if r["backend"] == backend and "qkv_format=" in r["variant"]:
                by.setdefault(r["qkv_format"], r)
        if {"thd", "bshd"} <= set(by):
            out[f"packed_speedup_{backend}"] = by["thd"]["tokens_per_s"] / by["bshd"]["tokens_per_s"]
    return out


def main(argv: list[str]) -> int:
    import torch
    import torch.distributed as dist

    a = parser().parse_args(argv)
    for name in ("seq_len", "batch", "micro_batch", "steps", "max_tokens_per_gpu"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    data = load_config_dict(a.config, a.preset)
    if a.layers is not None:
        data = with_layers(data, a.layers)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = a.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dtype = a.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    created = _init_dist(device)
    rank = dist.get_rank()
    own_dir = a.workdir is None
    # Every rank loads the model rank 0 writes: without --workdir, rank 0's temporary directory is shared
    # (ranks of one node under torchrun; across nodes pass a --workdir on a shared filesystem).
    shared: list[str | None] = [a.workdir or (tempfile.mkdtemp(prefix="miles-bench-train-") if rank == 0 else None)]
    dist.broadcast_object_list(shared, src=0)
    workdir = Path(str(shared[0]))
    model_dir = workdir / "model"
    try:
        if rank == 0 and not (model_dir / "config.json").exists():
            write_random_model(data, model_dir, device=device)
        dist.barrier()
        for v in a.variant:
            parse_variant(v)  # refuse a typo before minutes of measuring
        rows = [measure_backend(a, b, data, str(model_dir), device, dtype, v) for b in a.backend for v in a.variant]
        matmul = measured_matmul_tflops(device, dtype)
        peak, source = peak_tflops(device, dtype, a.peak_tflops)
        for r in rows:
            r["mfu"] = r["tflops_per_device"] / peak if peak else None
            r["of_matmul"] = r["tflops_per_device"] / matmul if matmul > 0 else None
        if rank == 0:
            report = Report(
                "train",
                settings={
                    "model_type": data.get("model_type"),
                    "layers": data.get("num_hidden_layers"),
                    "params": param_count(data),
                    "dtype": dtype,
                    "seq_len": a.seq_len,
                    "lengths": a.lengths,
                    "tokens_per_step": rows[0]["tokens_per_step"] if rows else None,
                    "batch": a.batch,
                    "micro_batch": a.micro_batch,
                    "max_tokens_per_gpu": a.max_tokens_per_gpu if a.micro_batch is None else None,
                    "variants": a.variant,
                    "steps": a.steps,
                    "warmup": a.warmup,
                    "preset": a.preset,
                    "config": a.config,
                },
            )
            report.machine = machine(device)
            report.rows = rows
            report.summary = {
                "peak_tflops": peak,
                "peak_source": source,
                "matmul_tflops_measured": matmul,
                "flops_per_token": train_flops_per_token(data, a.seq_len),
                **packing_speedups(rows),
            }
            report.notes.append(
                "MFU = model FLOPs (6N + 12*L*heads*head_dim*seq per token, fwd+bwd) / time / peak; "
                "of_matmul = the same against square matmuls measured on this device in this run"
            )
            report.print(
                [
                    "backend",
                    "variant",
                    "qkv_format",
                    "micro_batch",
                    "world",
                    "step_s",
                    "tokens_per_s",
                    "tflops_per_device",
                    "mfu",
                    "of_matmul",
                    "max_mem_gib",
                    "packed_kernel",
                ]
            )
            if a.json_out:
                report.write_json(a.json_out)
        dist.barrier()
    finally:
        if own_dir and rank == 0:
            shutil.rmtree(workdir, ignore_errors=True)
    if created:
        dist.destroy_process_group()
    return 0


__all__ = ["main"]
