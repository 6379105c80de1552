"""One rank of the Megatron GPU checks: ``python megatron_gpu_worker.py OUT_DIR WORK_DIR SCENARIO...``.

Started by ``test_megatron_gpu.py`` (2 or 4 ranks, NCCL, one GPU each; on a
CPU-only machine it falls back to gloo with the test CPU shim, which is how
the script itself is smoke-tested). Rank 0 writes ``OUT_DIR/<scenario>.pt``.

Scenarios (same HF model, same batch, same seed for both backends):

* ``equiv_<perf>_<dtype>``: the FSDP actor (DP = world) and the Megatron actor
  (``tp2``, ``tp2pp2``, ``tp2sdpa``: TP=2 with ``attention_backend = "sdpa"``, ``cp2``: context parallelism,
  ``tp2sp``: TP=2 with sequence parallelism, ``tp2cp2``: both, ``pp2cp2``: 4 ranks) each take one rollout of 2 optimizer
  steps; log-probs, per-step losses, gradient norms and the updated weights (exported to HF names).
* ``roundtrip``: every family at TP=2: HF -> Megatron -> HF export, bit for bit.
* ``moe_ep2``, ``moe_tp2sp``: a small Qwen3-MoE at EP=2, and at TP=2 with sequence parallelism, against FSDP.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
if not torch.cuda.is_available():
    sys.path.insert(0, os.path.join(ROOT, "tests", "unit", "train", "megatron"))
    import cpu_shim  # noqa: F401

from miles.algo.advantages import AdvantageInputs, compute_advantages  # noqa: E402
from miles.plan import trainer_mesh  # noqa: E402
from miles.sample import Sample  # noqa: E402
from miles.spec.tables import GrpoConfig, ModelConfig, OptimizerConfig, PerfConfig, Spec, TrainConfig  # noqa: E402
from miles.train.actor import ActorConfig, TrainerContext  # noqa: E402
from miles.train.backends import build_actor  # noqa: E402
from miles.train.batch import RolloutBatch  # noqa: E402

VOCAB = 1000
SMALL = bool(os.environ.get("MILES_GPU_SMOKE"))
"""Smoke mode (CPU): a model small enough for two CPU cores."""


def _mesh(perf: PerfConfig) -> Any:
    """The planner's mesh for ``perf`` over this world (what the actor builds its groups from)."""
    return trainer_mesh(Spec(perf=perf), dist.get_world_size())


def hf_config(family: str) -> Any:
    from transformers import AutoConfig

    size = (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
        if SMALL
        else dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8)
    )
    extra: dict[str, Any] = {
        "qwen2": {"tie_word_embeddings": True},
        "qwen3": {"head_dim": 64 if not SMALL else 16},
        "llama": {
            "max_position_embeddings": 4096,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        },
        "qwen3_moe": {
            "moe_intermediate_size": 128 if not SMALL else 32,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
        },
    }[family]
    return AutoConfig.for_model(family, vocab_size=VOCAB, num_key_value_heads=4 if not SMALL else 2, **size, **extra)


def write_model(path: str, family: str) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf_config(family)).float().save_pretrained(path)


def rollout(seed: int = 1, n: int = 16) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        p = 8 + int(torch.randint(0, 16, (1,), generator=g))
        r = 8 + int(torch.randint(0, 32, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (p + r,), generator=g).tolist()
        samples.append(
            Sample(
                group_index=i // 4,
                prompt_index=i // 4,
                prompt="",
                prompt_text="",
                prompt_ids=ids[:p],
                response_ids=ids[p:],
                response_logprobs=[-1.0] * r,
                reward=float(torch.rand(1, generator=g) > 0.5),
            )
        )
    batch = RolloutBatch.from_samples(samples)
    batch.advantages = compute_advantages(
        GrpoConfig(), AdvantageInputs(rewards=batch.rewards, group_index=batch.group_index, loss_masks=batch.loss_masks)
    )
    return batch


def spec(perf: PerfConfig, dtype: str) -> Spec:
    return Spec(
        model=ModelConfig(dtype=dtype),  # type: ignore[arg-type]
        train=TrainConfig(global_batch_size=8, num_steps_per_rollout=2, micro_batch_size=2),
        perf=perf,
        optimizer=OptimizerConfig(lr=1e-4, lr_warmup_iters=0, clip_grad=1.0),
        grpo=GrpoConfig(use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="low_var_kl", entropy_coef=0.01),
    )


def fsdp_names_to_checkpoint(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 keeps MoE experts fused in memory (``experts.gate_up_proj`` [E, 2F, H], ``down_proj``
    [E, H, F]); split them into the checkpoint's per-expert names so both backends compare by the same names."""
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = gate[e], up[e]
        elif name.endswith("mlp.experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


def run_backend(name: str, sp: Spec, ctx: TrainerContext) -> dict[str, Any]:
    mesh = trainer_mesh(sp, dist.get_world_size(), ctx.model_dir)
    actor = build_actor(ActorConfig.from_spec(sp), dataclasses.replace(ctx, mesh=mesh))
    batch = rollout()
    batch.old_logprobs = actor.compute_logprobs(batch)
    batch.ref_logprobs = actor.compute_logprobs(batch, model="ref")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    metrics = actor.train(batch, rollout_id=0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    weights = {n: t.detach().float().cpu().clone() for n, t in actor.named_hf_weights()}
    res = {
        "old_logprobs": batch.old_logprobs,
        "metrics": metrics,
        "train_s": train_s,
        "weights": fsdp_names_to_checkpoint(weights) if name == "fsdp" else weights,
    }
    del actor
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def scenario_equiv(
    work: str, out: dict[str, Any], family: str, perf: PerfConfig, dtype: str, device: torch.device
) -> None:
    d = os.path.join(work, family)
    ctx = TrainerContext(model_dir=d, num_rollout=1, device=device)
    out["fsdp"] = run_backend("fsdp", spec(PerfConfig(backend="fsdp"), dtype), ctx)
    out["megatron"] = run_backend("megatron", spec(perf, dtype), ctx)


def scenario_roundtrip(work: str, out: dict[str, Any], device: torch.device) -> None:
    from miles.train.megatron.config import read_hf_arch
    from miles.train.megatron.model import build_gpt_model, init_parallel
    from miles.train.megatron.weights import SafetensorsReader, export_hf_weights, load_hf_weights

    for family in ("qwen2", "qwen3", "llama", "qwen3_moe"):
        d = os.path.join(work, family)
        arch = read_hf_arch(d)
        perf = (
            PerfConfig(tp=1, ep=dist.get_world_size())
            if family == "qwen3_moe"
            else PerfConfig(tp=dist.get_world_size())
        )
        for dtype in (torch.float32, torch.bfloat16):
            mesh = _mesh(perf)
            init_parallel(mesh, 1234)
            model = build_gpt_model(arch, mesh, perf, dtype, False, device)
            load_hf_weights(model, arch, d)
            got = {n: t.cpu().clone() for n, t in export_hf_weights(model, arch, device)}
            reader = SafetensorsReader(d)
            bad = [n for n in reader.files if n not in got or not torch.equal(got[n], reader.get(n).to(dtype))]
            out[f"{family}/{dtype}"] = {
                "perf": dataclasses.asdict(perf),
                "tensors": len(got),
                "mismatched": bad,
                "extra": sorted(set(got) - set(reader.files)),
            }
            del model


def main() -> None:
    out_dir, work = sys.argv[1], sys.argv[2]
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        dist.init_process_group("nccl")
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        for family in ("qwen2", "qwen3", "llama", "qwen3_moe"):
            if not os.path.exists(os.path.join(work, family, "config.json")):
                write_model(os.path.join(work, family), family)
    dist.barrier()
    for scenario in sys.argv[3:]:
        out: dict[str, Any] = {
            "world": world,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        }
        t0 = time.perf_counter()
        if scenario == "roundtrip":
            scenario_roundtrip(work, out, device)
        elif scenario.startswith("equiv_"):
            _, layout, dtype = scenario.split("_")
            perf = {
                "tp2": PerfConfig(tp=2),
                "tp2pp2": PerfConfig(tp=2, pp=2),
                "tp2sdpa": PerfConfig(tp=2, attention_backend="sdpa"),
                # context parallelism: miles' attention over the CP group
                "cp2": PerfConfig(cp=2, attention_backend="sdpa"),
                "tp2cp2": PerfConfig(tp=2, cp=2, sequence_parallel=True, attention_backend="sdpa"),
                "pp2cp2": PerfConfig(pp=2, cp=2, attention_backend="sdpa"),
                # sequence parallelism with the recommended GPU switches
                "tp2sp": PerfConfig(tp=2, sequence_parallel=True, attention_backend="sdpa", fused_kernels=True),
            }[layout]
            scenario_equiv(work, out, "qwen2", perf, {"fp32": "float32", "bf16": "bfloat16"}[dtype], device)
        elif scenario.startswith("moe_"):
            _, layout, dtype = scenario.split("_")
            # EP=2 (DP=2), or TP=2 with sequence parallelism (experts split over TP: etp = tp)
            perf = {"ep2": PerfConfig(ep=2), "tp2sp": PerfConfig(tp=2, sequence_parallel=True)}[layout]
            scenario_equiv(work, out, "qwen3_moe", perf, {"fp32": "float32", "bf16": "bfloat16"}[dtype], device)
        else:
            raise SystemExit(f"unknown scenario {scenario}")
        out["wall_s"] = time.perf_counter() - t0
        if rank == 0:
            torch.save(out, os.path.join(out_dir, f"{scenario}.pt"))
            print(f"scenario {scenario} done in {out['wall_s']:.1f}s", flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
