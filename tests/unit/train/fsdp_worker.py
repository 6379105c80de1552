"""One trainer rank of the FSDP actor tests: ``python fsdp_worker.py OUT_DIR MODEL_DIR SCENARIO...``.

Started by ``test_fsdp.py`` once per rank with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set;
rank 0 writes each scenario's results with ``torch.save`` into OUT_DIR.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import time

import torch
import torch.distributed as dist

from miles.spec.tables import Spec
from miles.train.actor import Actor, ActorConfig, TrainerContext, prepare_batch
from miles.train.backends import build_actor
from miles.train.batch import RolloutBatch
from tests.unit.train.tiny_model import fixed_samples, rollout_batch, tiny_spec


def _weights(actor) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {n: t.detach().to("cpu").clone() for n, t in actor.named_hf_weights()}


def _prepare(actor, batch: RolloutBatch) -> RolloutBatch:  # type: ignore[no-untyped-def]
    batch.old_logprobs = actor.compute_logprobs(batch)
    batch.ref_logprobs = actor.compute_logprobs(batch, model="ref")
    return batch


def _actor(spec: Spec, ctx: TrainerContext) -> Actor:
    """The FSDP actor from the spec's actor config, as ``session.components.build`` makes it."""
    return build_actor(ActorConfig.from_spec(spec), ctx)


def scenario_update(ctx: TrainerContext, out: dict, dtype: str = "float32", **train: object) -> None:
    """One rollout (2 optimizer steps) from the initial weights: metrics and updated weights."""
    spec = tiny_spec(**train)
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, dtype=dtype))
    cfg = ActorConfig.from_spec(spec)
    actor = build_actor(cfg, ctx)
    assert isinstance(actor, Actor)
    out["initial"] = _weights(actor)
    batch = prepare_batch(actor, fixed_samples(1), cfg)  # what the loop calls: old + ref log-probs, advantages
    assert batch.old_logprobs is not None and batch.ref_logprobs is not None and batch.advantages is not None
    t0 = time.perf_counter()
    out["metrics"] = actor.train(batch, rollout_id=0)
    out["train_s"] = time.perf_counter() - t0
    out["old_logprobs"] = batch.old_logprobs
    out["weights"] = _weights(actor)


def scenario_packing(ctx: TrainerContext, out: dict) -> None:
    """The same rollout padded and packed (two samples per micro-batch, one optimizer step): per-token log-probs
    and entropies of all eight samples in one micro-batch, the step's metrics and its gradients."""
    from torch.distributed.tensor import DTensor

    for fmt in ("bshd", "thd"):
        spec = tiny_spec(global_batch_size=8, num_steps_per_rollout=1, micro_batch_size=2, qkv_format=fmt)
        actor = _actor(spec, ctx)
        batch = _prepare(actor, rollout_batch(1))
        mb = actor._collate(batch, list(range(8)))  # type: ignore[attr-defined]
        with torch.no_grad():
            lp, ent = actor._forward(actor.model, mb)  # type: ignore[attr-defined]
        trained = mb.mask.bool()
        metrics = actor.train(batch, rollout_id=0)
        grads = {}
        for n, p in actor.model.named_parameters():  # type: ignore[attr-defined]
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            grads[n] = g.detach().to("cpu").clone()
        out[fmt] = {
            "packed": mb.packed,
            "lp": lp[trained].to("cpu"),
            "ent": ent[trained].to("cpu"),
            "old_logprobs": batch.old_logprobs,
            "advantages": batch.advantages,
            "tokens": sum(batch.seq_len(i) for i in range(len(batch))),
            "metrics": metrics,
            "grads": grads,
        }


def scenario_learn(ctx: TrainerContext, out: dict) -> None:
    """Six rollouts on the same batch with fixed old log-probs: the surrogate loss must fall."""
    actor = _actor(tiny_spec(), ctx)
    batch = _prepare(actor, rollout_batch(1))
    out["metrics"] = [m for r in range(6) for m in actor.train(batch, rollout_id=r)]
    out["new_logprobs"] = actor.compute_logprobs(batch)
    out["old_logprobs"] = batch.old_logprobs
    out["advantages"] = batch.advantages


def scenario_resume(ctx: TrainerContext, out: dict, ckpt: str) -> None:
    """Train, save, train again; a fresh actor loading the save must repeat the second train bit for bit."""
    spec = tiny_spec()
    a = _actor(spec, ctx)
    a.train(_prepare(a, rollout_batch(1)), rollout_id=0)
    t0 = time.perf_counter()
    a.save(ckpt)
    out["save_s"] = time.perf_counter() - t0
    m_a = a.train(_prepare(a, rollout_batch(2)), rollout_id=1)
    w_a = _weights(a)
    b = _actor(spec, ctx)
    t0 = time.perf_counter()
    b.load(ckpt)
    out["load_s"] = time.perf_counter() - t0
    out["step_after_load"] = b.step
    m_b = b.train(_prepare(b, rollout_batch(2)), rollout_id=1)
    out["metrics"] = (m_a, m_b)
    out["weights"] = (w_a, _weights(b))


def scenario_save_variants(ctx: TrainerContext, out: dict, work: str) -> None:
    """A moved reference is checkpointed and restored; ``no_save_optim`` restores weights and step only."""
    base = tiny_spec()
    spec = dataclasses.replace(base, grpo=dataclasses.replace(base.grpo, ref_update_interval=1))
    a = _actor(spec, ctx)
    batch = _prepare(a, rollout_batch(1))
    out["ref_initial"] = batch.ref_logprobs
    a.train(batch, rollout_id=0)
    a.update_ref()
    a.save(os.path.join(work, "with_ref"))
    b = _actor(spec, ctx)
    b.load(os.path.join(work, "with_ref"))
    out["ref_saved"] = a.compute_logprobs(batch, model="ref")
    out["ref_loaded"] = b.compute_logprobs(batch, model="ref")
    out["actor_saved"] = a.compute_logprobs(batch)

    no_optim = dataclasses.replace(base, ckpt=dataclasses.replace(base.ckpt, no_save_optim=True))
    c = _actor(no_optim, ctx)
    c.train(_prepare(c, rollout_batch(1)), rollout_id=0)
    c.save(os.path.join(work, "no_optim"))
    d = _actor(no_optim, ctx)
    d.load(os.path.join(work, "no_optim"))
    out["no_optim_weights"] = (_weights(c), _weights(d))
    out["no_optim_step"] = d.step
    out["no_optim_state_len"] = len(d.optimizer.state)  # type: ignore[attr-defined]


def scenario_offload(ctx: TrainerContext, out: dict) -> None:
    """Offload and onload between two rollouts: memory is freed, and training continues as if nothing moved."""
    gc.collect()  # earlier scenarios' actors (reference cycles through FSDP hooks)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    a = _actor(tiny_spec(), ctx)
    a.train(_prepare(a, rollout_batch(1)), rollout_id=0)
    a.compute_logprobs(rollout_batch(1))  # a forward leaves the root unit's parameters gathered
    torch.cuda.synchronize()
    out["footprint"] = torch.cuda.memory_allocated() - base
    a.offload()
    out["left"] = torch.cuda.memory_allocated() - base
    a.onload()
    a.train(_prepare(a, rollout_batch(2)), rollout_id=1)
    out["weights"] = _weights(a)


def scenario_export(ctx: TrainerContext, out: dict, model_dir: str) -> None:
    """Exported HF weights load into a plain HF model whose logits equal the FSDP model's."""
    from transformers import AutoModelForCausalLM

    actor = _actor(tiny_spec(), ctx)
    batch = _prepare(actor, rollout_batch(1))
    actor.train(batch, rollout_id=0)
    weights = _weights(actor)
    after = actor.compute_logprobs(batch)
    hf_dir = os.path.join(os.path.dirname(model_dir), "exported")
    actor.save_hf(hf_dir)
    ids = torch.arange(1, 17).reshape(2, 8).to(ctx.device)
    with torch.no_grad():
        fsdp_logits = actor.model(input_ids=ids, use_cache=False).logits.cpu()  # type: ignore[operator]
    if dist.get_rank() == 0:
        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(ctx.device)
        missing, unexpected = plain.load_state_dict(weights, strict=False)
        out["missing"], out["unexpected"] = list(missing), list(unexpected)
        with torch.no_grad():
            out["plain_logits"] = plain(input_ids=ids, use_cache=False).logits.cpu()
        out["fsdp_logits"] = fsdp_logits
        out["names"] = list(weights)
        # log-probs of each sample computed alone and unpadded by plain HF: the actor's batching must agree
        direct = []
        with torch.no_grad():
            for i in range(len(batch)):
                logits = plain(input_ids=batch.tokens[i][None].to(ctx.device), use_cache=False).logits[0].cpu()
                p = batch.prompt_lens[i]
                lp = torch.log_softmax(logits[p - 1 : -1].float(), -1)
                direct.append(lp.gather(-1, batch.tokens[i][p:, None]).squeeze(-1))
        out["direct_logprobs"], out["actor_logprobs"] = direct, after
        reloaded = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(ctx.device)
        with torch.no_grad():
            out["reloaded_logits"] = reloaded(input_ids=ids, use_cache=False).logits.cpu()
        out["exported_files"] = sorted(os.listdir(hf_dir))


def scenario_moe_export(ctx: TrainerContext, out: dict, work: str) -> None:
    """A Qwen3-MoE actor exports checkpoint names (per expert), which load back into the same logits."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    moe_dir = os.path.join(work, "moe")
    if dist.get_rank() == 0:
        torch.manual_seed(0)
        cfg = Qwen3MoeConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            tie_word_embeddings=False,
        )
        AutoModelForCausalLM.from_config(cfg).save_pretrained(moe_dir)
    dist.barrier()
    actor = _actor(tiny_spec(), dataclasses.replace(ctx, model_dir=moe_dir))
    out["names"] = sorted(_weights(actor))
    hf_dir = os.path.join(work, "moe_exported")
    actor.save_hf(hf_dir)
    ids = torch.arange(1, 17).reshape(2, 8).to(ctx.device)
    with torch.no_grad():
        out["actor_logits"] = actor.model(input_ids=ids, use_cache=False).logits.cpu()  # type: ignore[operator]
    if dist.get_rank() == 0:
        from safetensors import safe_open

        with safe_open(os.path.join(moe_dir, "model.safetensors"), "pt") as f:
            out["checkpoint_names"] = sorted(f.keys())
        reloaded = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(ctx.device)
        with torch.no_grad():
            out["reloaded_logits"] = reloaded(input_ids=ids, use_cache=False).logits.cpu()


def main() -> None:
    out_dir, model_dir, *scenarios = sys.argv[1:]
    torch.set_num_threads(1)
    if os.environ.get("MILES_TEST_DEVICE", "cpu") == "cuda":
        # bit-exact resume on GPUs needs deterministic kernels (embedding backward uses atomics otherwise)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    ctx = TrainerContext(model_dir=model_dir, num_rollout=8, device=device)
    for name in scenarios:
        out: dict = {}
        if name == "update":
            scenario_update(ctx, out)
        elif name == "update_balanced":
            scenario_update(ctx, out, balance_data=True)
        elif name == "update_dynamic":
            scenario_update(ctx, out, use_dynamic_batch_size=True, max_tokens_per_gpu=24, micro_batch_size=1)
        elif name == "packing":
            scenario_packing(ctx, out)
        elif name == "bf16":
            scenario_update(ctx, out, dtype="bfloat16")
        elif name == "learn":
            scenario_learn(ctx, out)
        elif name == "resume":
            scenario_resume(ctx, out, os.path.join(out_dir, "ckpt"))
        elif name == "save_variants":
            scenario_save_variants(ctx, out, out_dir)
        elif name == "offload":
            scenario_offload(ctx, out)
        elif name == "export":
            scenario_export(ctx, out, model_dir)
        elif name == "moe_export":
            scenario_moe_export(ctx, out, out_dir)
        else:
            raise SystemExit(f"unknown scenario {name}")
        if dist.get_rank() == 0:
            torch.save(out, os.path.join(out_dir, f"{name}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
