"""One trainer rank of the FSDP actor tests: ``python fsdp_worker.py OUT_DIR MODEL_DIR SCENARIO...``.

Started by ``test_fsdp.py`` once per rank with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set;
rank 0 writes each scenario's results with ``torch.save`` into OUT_DIR.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from miles.train.actor import TrainerContext, build_actor
from miles.train.batch import RolloutBatch
from tests.unit.train.tiny_model import rollout_batch, tiny_spec


def _weights(actor) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {n: t.clone() for n, t in actor.named_hf_weights()}


def _prepare(actor, batch: RolloutBatch) -> RolloutBatch:  # type: ignore[no-untyped-def]
    batch.old_logprobs = actor.compute_logprobs(batch)
    batch.ref_logprobs = actor.compute_logprobs(batch, model="ref")
    return batch


def scenario_update(ctx: TrainerContext, out: dict, **train: object) -> None:
    """One rollout (2 optimizer steps) from the initial weights: metrics and updated weights."""
    actor = build_actor(tiny_spec(**train), ctx)
    batch = _prepare(actor, rollout_batch(1))
    t0 = time.perf_counter()
    out["metrics"] = actor.train(batch, rollout_id=0)
    out["train_s"] = time.perf_counter() - t0
    out["old_logprobs"] = batch.old_logprobs
    out["weights"] = _weights(actor)


def scenario_learn(ctx: TrainerContext, out: dict) -> None:
    """Six rollouts on the same batch with fixed old log-probs: the surrogate loss must fall."""
    actor = build_actor(tiny_spec(), ctx)
    batch = _prepare(actor, rollout_batch(1))
    out["metrics"] = [m for r in range(6) for m in actor.train(batch, rollout_id=r)]
    out["new_logprobs"] = actor.compute_logprobs(batch)
    out["old_logprobs"] = batch.old_logprobs
    out["advantages"] = batch.advantages


def scenario_resume(ctx: TrainerContext, out: dict, ckpt: str) -> None:
    """Train, save, train again; a fresh actor loading the save must repeat the second train bit for bit."""
    spec = tiny_spec()
    a = build_actor(spec, ctx)
    a.train(_prepare(a, rollout_batch(1)), rollout_id=0)
    t0 = time.perf_counter()
    a.save(ckpt)
    out["save_s"] = time.perf_counter() - t0
    m_a = a.train(_prepare(a, rollout_batch(2)), rollout_id=1)
    w_a = _weights(a)
    b = build_actor(spec, ctx)
    t0 = time.perf_counter()
    b.load(ckpt)
    out["load_s"] = time.perf_counter() - t0
    out["step_after_load"] = b.step
    m_b = b.train(_prepare(b, rollout_batch(2)), rollout_id=1)
    out["metrics"] = (m_a, m_b)
    out["weights"] = (w_a, _weights(b))


def scenario_export(ctx: TrainerContext, out: dict, model_dir: str) -> None:
    """Exported HF weights load into a plain HF model whose logits equal the FSDP model's."""
    from transformers import AutoModelForCausalLM

    actor = build_actor(tiny_spec(), ctx)
    actor.train(_prepare(actor, rollout_batch(1)), rollout_id=0)
    weights = _weights(actor)
    ids = torch.arange(1, 17).reshape(2, 8)
    with torch.no_grad():
        fsdp_logits = actor.model(input_ids=ids, use_cache=False).logits  # type: ignore[operator]
    if dist.get_rank() == 0:
        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(weights, strict=False)
        out["missing"], out["unexpected"] = list(missing), list(unexpected)
        with torch.no_grad():
            out["plain_logits"] = plain(input_ids=ids, use_cache=False).logits
        out["fsdp_logits"] = fsdp_logits
        out["names"] = list(weights)


def main() -> None:
    out_dir, model_dir, *scenarios = sys.argv[1:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    ctx = TrainerContext(model_dir=model_dir, num_rollout=8, device=torch.device("cpu"))
    for name in scenarios:
        out: dict = {}
        if name == "update":
            scenario_update(ctx, out)
        elif name == "update_dynamic":
            scenario_update(ctx, out, use_dynamic_batch_size=True, max_tokens_per_gpu=24, micro_batch_size=1)
        elif name == "learn":
            scenario_learn(ctx, out)
        elif name == "resume":
            scenario_resume(ctx, out, os.path.join(out_dir, "ckpt"))
        elif name == "export":
            scenario_export(ctx, out, model_dir)
        else:
            raise SystemExit(f"unknown scenario {name}")
        if dist.get_rank() == 0:
            torch.save(out, os.path.join(out_dir, f"{name}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
