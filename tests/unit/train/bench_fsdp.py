"""Time the FSDP actor's phases on a realistic shape: ``torchrun --nproc-per-node N bench_fsdp.py [preset]``.

Presets are random-weight HF configs (no hub access needed): ``qwen2.5-0.5b``
(the Qwen2.5-0.5B shape, bf16) for GPUs, ``tiny-arith`` (the quickstart model)
for CPUs. Prints one JSON line per phase from rank 0.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from miles.algo.advantages import AdvantageInputs, compute_advantages
from miles.sample import Sample
from miles.spec.tables import GrpoConfig, ModelConfig, OptimizerConfig, PerfConfig, RolloutConfig, Spec, TrainConfig
from miles.train.actor import ActorConfig, TrainerContext
from miles.train.backends import build_actor
from miles.train.batch import RolloutBatch

PRESETS = {
    # name: (config kwargs, dtype, samples, prompt len, response len, global batch, micro batch)
    "qwen2.5-0.5b": (
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            max_position_embeddings=4096,
        ),
        "bfloat16",
        64,
        256,
        768,
        32,
        4,
    ),
    "tiny-arith": (
        dict(
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=24,
            tie_word_embeddings=True,
            max_position_embeddings=128,
        ),
        "float32",
        256,
        7,
        1,
        128,
        64,
    ),
}


def main() -> None:
    preset = sys.argv[1] if len(sys.argv) > 1 else "tiny-arith"
    cfg_kw, dtype, n, plen, rlen, gbs, mbs = PRESETS[preset]
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    work = os.environ.get("BENCH_DIR") or tempfile.gettempdir()
    model_dir = os.path.join(work, f"bench-{preset}")
    if rank == 0 and not os.path.exists(os.path.join(model_dir, "config.json")):
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0)
        Qwen2ForCausalLM(Qwen2Config(**cfg_kw)).save_pretrained(model_dir)
    dist.barrier()

    spec = Spec(
        model=ModelConfig(dtype=dtype),  # type: ignore[arg-type]
        rollout=RolloutConfig(rollout_max_response_len=rlen),
        train=TrainConfig(global_batch_size=gbs, num_steps_per_rollout=n // gbs, micro_batch_size=mbs),
        perf=PerfConfig(backend="fsdp"),
        optimizer=OptimizerConfig(lr=1e-6),
        grpo=GrpoConfig(use_kl_loss=True, kl_loss_coef=0.01, kl_loss_type="low_var_kl"),
    )
    t0 = time.perf_counter()
    actor = build_actor(ActorConfig.from_spec(spec), TrainerContext(model_dir=model_dir, num_rollout=10, device=device))
    report = {
        "preset": preset,
        "world_size": dist.get_world_size(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "build_s": time.perf_counter() - t0,
    }
    g = torch.Generator().manual_seed(0)
    vocab = int(cfg_kw["vocab_size"])  # type: ignore[call-overload]
    samples = [
        Sample(
            group_index=i // 8,
            prompt_index=i // 8,
            prompt="",
            prompt_text="",
            prompt_ids=torch.randint(1, vocab, (plen,), generator=g).tolist(),
            response_ids=torch.randint(1, vocab, (rlen,), generator=g).tolist(),
            reward=float(i % 3 == 0),
        )
        for i in range(n)
    ]
    batch = RolloutBatch.from_samples(samples)
    batch.advantages = compute_advantages(
        spec.grpo, AdvantageInputs(batch.rewards, batch.group_index, batch.loss_masks)
    )

    def timed(fn):  # type: ignore[no-untyped-def]
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    for it in range(3):
        batch.ref_logprobs, t_ref = timed(lambda: actor.compute_logprobs(batch, model="ref"))
        batch.old_logprobs, t_old = timed(lambda: actor.compute_logprobs(batch))
        metrics, t_train = timed(lambda it=it: actor.train(batch, it))  # type: ignore[misc]
        report[f"rollout{it}"] = {
            "ref_logprobs_s": t_ref,
            "old_logprobs_s": t_old,
            "train_s": t_train,
            "step_s": [m["step_time_s"] for m in metrics],
            "tokens_per_s": sum(m["train_tokens"] for m in metrics) / t_train,
        }
    _, report["export_s"] = timed(lambda: [t.sum() for _, t in actor.named_hf_weights()])
    ckpt = os.path.join(work, f"bench-ckpt-{preset}")
    _, report["dcp_save_s"] = timed(lambda: actor.save(ckpt))
    _, report["dcp_load_s"] = timed(lambda: actor.load(ckpt))
    if cuda:
        report["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if rank == 0:
        print(json.dumps(report), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
