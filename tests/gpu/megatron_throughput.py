"""Measure the Megatron actor's GRPO training throughput and MFU on one GPU (a measurement, not a test).

``python tests/gpu/megatron_throughput.py [--layers 16 --hidden 2048 ...]`` with RANK/WORLD_SIZE/MASTER_*
set (world 1). Builds a Llama-3.2-1B-shaped HF checkpoint with random bf16 weights, then times
``MegatronActor.train`` (one optimizer step over ``--samples`` sequences of ``--seq`` tokens, micro-batch 1,
after one warm-up step). Model FLOPs per token: ``6 * N + 12 * L * H * S`` (N: parameters without the
input embedding; the attention term counts the full S x S score matrix). Peak: ``--peak-tflops``
(989 for H100/H200 SXM dense bf16). ``miles bench train`` is the user-facing version.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
if not torch.cuda.is_available():
    sys.path.insert(0, os.path.join(ROOT, "tests", "unit", "train", "megatron"))
    import cpu_shim  # noqa: F401

from miles.algo.advantages import AdvantageInputs, compute_advantages  # noqa: E402
from miles.plan import trainer_mesh  # noqa: E402
from miles.sample import Sample  # noqa: E402
from miles.spec.tables import GrpoConfig, ModelConfig, OptimizerConfig, PerfConfig, Spec, TrainConfig  # noqa: E402
from miles.train.actor import ActorConfig, TrainerContext  # noqa: E402
from miles.train.batch import RolloutBatch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--recompute", default="")
    ap.add_argument("--attention", choices=["unfused", "sdpa"], default="unfused")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, LlamaConfig

    from miles.train.megatron.actor import MegatronActor

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 4096),
        tie_word_embeddings=True,
    )
    model_dir = tempfile.mkdtemp(prefix="mfu-model-")
    torch.manual_seed(0)
    with device:
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in hf.parameters())
    n_embed = hf.get_input_embeddings().weight.numel()
    hf.save_pretrained(model_dir)
    del hf

    spec = Spec(
        model=ModelConfig(dtype="bfloat16" if cuda else "float32"),
        train=TrainConfig(global_batch_size=args.samples, num_steps_per_rollout=1, micro_batch_size=1),
        perf=PerfConfig(
            recompute_granularity=args.recompute or None,  # type: ignore[arg-type]
            attention_backend=args.attention,
        ),  # type: ignore[arg-type]
        optimizer=OptimizerConfig(lr=1e-5),
        grpo=GrpoConfig(),
    )
    mesh = trainer_mesh(spec, dist.get_world_size(), model_dir)
    actor = MegatronActor(ActorConfig.from_spec(spec), TrainerContext(model_dir, 3, device, mesh=mesh))
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(args.samples):
        ids = torch.randint(1, args.vocab, (args.seq,), generator=g).tolist()
        samples.append(
            Sample(
                group_index=i // 4,
                prompt_index=i // 4,
                prompt="",
                prompt_text="",
                prompt_ids=ids[: args.prompt],
                response_ids=ids[args.prompt :],
                reward=float(i % 2),
            )
        )
    batch = RolloutBatch.from_samples(samples)
    batch.advantages = compute_advantages(
        GrpoConfig(), AdvantageInputs(rewards=batch.rewards, group_index=batch.group_index, loss_masks=batch.loss_masks)
    )
    times = []
    for r in range(3):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        actor.train(batch, rollout_id=r)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step = min(times[1:])
    tokens = args.samples * args.seq
    # Tied embeddings: the embedding matrix is also the LM head, whose matmul is real work (6 * V * H per
    # token), while the input lookup is not; so N = all parameters, each counted once.
    del n_embed
    flops_per_token = 6 * n_params + 12 * args.layers * args.hidden * args.seq
    tflops = tokens * flops_per_token / step / 1e12
    res = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "params": n_params,
        "seq": args.seq,
        "samples": args.samples,
        "step_s": times,
        "tokens_per_s": tokens / step,
        "model_tflops": tflops,
        "mfu": tflops / args.peak_tflops,
        "peak_tflops": args.peak_tflops,
        "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "recompute": args.recompute,
        "attention": args.attention,
    }
    print(json.dumps(res), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(res, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
