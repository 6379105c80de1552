"""One rank of the Megatron backend's CPU tests: ``python megatron_worker.py OUT_DIR WORK_DIR SCENARIO...``.

Started by ``test_megatron_actor.py`` once per rank (world 2, and world 4 for the TP/PP x CP layouts; gloo) with
RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set. Rank 0 ``torch.save``s each
scenario's results to ``OUT_DIR/<scenario>.pt``. The ``__main__`` guard is
required: dist_checkpointing starts spawn workers that re-import this file.
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
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import cpu_shim  # noqa: E402,F401  (before megatron builds anything)
from tiny_model import rollout_batch, tiny_spec, write_tiny_qwen2  # noqa: E402

from miles.plan import trainer_mesh  # noqa: E402
from miles.spec.tables import PerfConfig, Spec  # noqa: E402
from miles.train.actor import Actor, ActorConfig, TrainerContext  # noqa: E402
from miles.train.backends import build_actor  # noqa: E402
from miles.train.batch import RolloutBatch  # noqa: E402

FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2": {"model_type": "qwen2"},
    "qwen3": {"model_type": "qwen3", "head_dim": 8},
    "llama": {
        "model_type": "llama",
        "max_position_embeddings": 256,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "head_dim": 8,
        "moe_intermediate_size": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
    },
}


def _mesh(perf: PerfConfig) -> Any:
    """The planner's mesh for ``perf`` over this world (what the actor builds its groups from)."""
    return trainer_mesh(Spec(perf=perf), dist.get_world_size())


def _actor(spec: Spec, ctx: TrainerContext) -> Actor:
    """The actor as ``session.components.build`` makes it: its config from the spec, the planner's mesh."""
    mesh = trainer_mesh(spec, dist.get_world_size(), ctx.model_dir)
    return build_actor(ActorConfig.from_spec(spec), dataclasses.replace(ctx, mesh=mesh))


def write_family(path: str, family: str, seed: int = 0, vocab: int = 95) -> None:
    """A tiny random HF checkpoint of ``family`` (vocab 95: not divisible by TP=2, so padding is exercised)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(FAMILY_CONFIGS[family])
    model_type = kw.pop("model_type")
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        **kw,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).float().save_pretrained(path)


def megatron_spec(perf: PerfConfig, **train: object) -> Spec:
    return dataclasses.replace(tiny_spec(**train), perf=perf)


def _prepare(actor: Any, batch: RolloutBatch) -> RolloutBatch:
    batch.old_logprobs = actor.compute_logprobs(batch)
    batch.ref_logprobs = actor.compute_logprobs(batch, model="ref")
    return batch


def _weights(actor: Any) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in actor.named_hf_weights()}


def scenario_equiv(
    work: str, out: dict[str, Any], perf: PerfConfig, with_fsdp: bool = True, model: str = "qwen2-tied"
) -> None:
    """FSDP (DP=2) and Megatron (``perf``) from the same tiny model, same rollout: log-probs, losses, weights."""
    model_dir = os.path.join(work, model)
    ctx = TrainerContext(model_dir=model_dir, num_rollout=1, device=torch.device("cpu"))
    runs = (("fsdp", tiny_spec()), ("megatron", megatron_spec(perf)))
    for name, spec in runs if with_fsdp else runs[1:]:
        actor = _actor(spec, ctx)
        batch = _prepare(actor, rollout_batch(1))
        t0 = time.perf_counter()
        metrics = actor.train(batch, rollout_id=0)
        config = actor.model.config if name == "megatron" else None  # type: ignore[attr-defined]
        out[name] = {
            "parallel": None if config is None else (config.context_parallel_size, config.sequence_parallel),
            "old_logprobs": batch.old_logprobs,
            "ref_logprobs": batch.ref_logprobs,
            "metrics": metrics,
            "weights": _weights(actor),
            "train_s": time.perf_counter() - t0,
        }


def scenario_packing(work: str, out: dict[str, Any]) -> None:
    """The same rollout padded and packed (four samples per micro-batch, one optimizer step) at TP=2 with sequence
    parallelism and at PP=2: per-token log-probs and entropies (TP), old log-probs, metrics and this rank's
    gradients."""
    ctx = TrainerContext(model_dir=os.path.join(work, "qwen2-tied"), num_rollout=1, device=torch.device("cpu"))
    for layout, perf in (("tp2sp", PerfConfig(tp=2, sequence_parallel=True)), ("pp2", PerfConfig(pp=2))):
        for fmt in ("bshd", "thd"):
            spec = megatron_spec(perf, global_batch_size=8, num_steps_per_rollout=1, micro_batch_size=4, qkv_format=fmt)
            actor: Any = _actor(spec, ctx)
            batch = _prepare(actor, rollout_batch(1))
            res: dict[str, Any] = {
                "packed": actor.packed,
                "old_logprobs": batch.old_logprobs,
                "advantages": batch.advantages,
                "tokens": sum(batch.seq_len(i) for i in range(len(batch))),
            }
            if layout == "tp2sp":
                mb = actor._collate(batch, list(range(8)))

                def stats(mb: Any, output: torch.Tensor, actor: Any = actor) -> Any:
                    lp, ent = actor._token_stats(output, mb)
                    trained = mb.mask.bool()
                    return lp.sum() * 0.0, actor._zero_tokens(), {"lp": lp[trained], "ent": ent[trained]}

                with torch.no_grad():
                    (row,) = actor._run(actor.model, [mb], stats, forward_only=True)
                res.update(lp=row["lp"], ent=row["ent"])
            res["metrics"] = actor.train(batch, rollout_id=0)
            res["grads"] = {n: p.main_grad.clone() for n, p in actor.model.module.named_parameters()}
            out[f"{layout}_{fmt}"] = res


def scenario_roundtrip(work: str, out: dict[str, Any]) -> None:
    """Every family at TP=2 (Qwen3-MoE at TP=2 x EP=2): HF -> Megatron -> HF bit for bit; log-probs match HF."""
    from megatron.core import parallel_state as ps
    from transformers import AutoModelForCausalLM

    from miles.algo.loss import logprobs_and_entropy
    from miles.train.megatron.config import read_hf_arch
    from miles.train.megatron.logprobs import vocab_parallel_logprobs_and_entropy
    from miles.train.megatron.model import build_gpt_model, init_parallel
    from miles.train.megatron.weights import SafetensorsReader, export_hf_weights, load_hf_weights

    for family in FAMILY_CONFIGS:
        d = os.path.join(work, family)
        arch = read_hf_arch(d)
        perf = PerfConfig(tp=2, ep=2, etp=1) if family == "qwen3_moe" else PerfConfig(tp=2)
        mesh = _mesh(perf)
        init_parallel(mesh, 1234)
        model = build_gpt_model(arch, mesh, perf, torch.float32, False, torch.device("cpu"))
        load_hf_weights(model, arch, d)
        exported = {n: t.clone() for n, t in export_hf_weights(model, arch, torch.device("cpu"))}
        reader = SafetensorsReader(d)
        ids = torch.randint(0, arch.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
        model.eval()  # Megatron refuses MoE + TP without sequence parallelism only in training mode
        with torch.no_grad():
            logits = model(ids, torch.arange(12).unsqueeze(0).expand(2, -1), None)
            local = logits.shape[-1]
            lp, ent = vocab_parallel_logprobs_and_entropy(
                logits[:, :-1],
                ids[:, 1:],
                vocab_start=ps.get_tensor_model_parallel_rank() * local,
                vocab_size=arch.vocab_size,
                group=ps.get_tensor_model_parallel_group(),
            )
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
            ref_lp, ref_ent = logprobs_and_entropy(hf(ids).logits[:, :-1], ids[:, 1:])
        out[family] = {
            "names": sorted(exported),
            "hf_names": sorted(reader.files),
            "mismatched": [n for n in reader.files if n not in exported or not torch.equal(exported[n], reader.get(n))],
            "lp": lp,
            "ref_lp": ref_lp,
            "ent": ent,
            "ref_ent": ref_ent,
        }
    # [perf] attention_backend = "sdpa": same log-probs as HF, same gradients as Megatron's unfused attention.
    d = os.path.join(work, "qwen3")  # GQA and qk-norm
    arch = read_hf_arch(d)
    ids = torch.randint(0, arch.vocab_size, (2, 12), generator=torch.Generator().manual_seed(8))
    grads = {}
    for backend in ("unfused", "sdpa"):
        perf = PerfConfig(tp=2, attention_backend=backend)
        mesh = _mesh(perf)
        init_parallel(mesh, 1234)
        model = build_gpt_model(arch, mesh, perf, torch.float32, False, torch.device("cpu"))
        load_hf_weights(model, arch, d)
        logits = model(ids, torch.arange(12).unsqueeze(0).expand(2, -1), None)
        local = logits.shape[-1]
        lp, _ = vocab_parallel_logprobs_and_entropy(
            logits[:, :-1],
            ids[:, 1:],
            vocab_start=ps.get_tensor_model_parallel_rank() * local,
            vocab_size=arch.vocab_size,
            group=ps.get_tensor_model_parallel_group(),
        )
        lp.sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
        out[f"qwen3_{backend}"] = {
            "lp": lp.detach(),
            "core": type(model.decoder.layers[0].self_attention.core_attention).__name__,
        }
    with torch.no_grad():
        hf_lp, _ = logprobs_and_entropy(
            AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(ids).logits[:, :-1], ids[:, 1:]
        )
    out["qwen3_hf_lp"] = hf_lp
    out["sdpa_grad_rel"] = max(
        float((grads["sdpa"][n] - g).norm() / g.norm().clamp(min=1e-30)) for n, g in grads["unfused"].items()
    )
    # bf16 at PP=2: Megatron keeps its norms in fp32; the export must still send and yield checkpoint-dtype tensors.
    d = os.path.join(work, "qwen3")
    arch = read_hf_arch(d)
    mesh = _mesh(PerfConfig(pp=2))
    init_parallel(mesh, 1234)
    model = build_gpt_model(arch, mesh, PerfConfig(pp=2), torch.bfloat16, False, torch.device("cpu"))
    load_hf_weights(model, arch, d)
    exported = {n: t.clone() for n, t in export_hf_weights(model, arch, torch.device("cpu"))}
    reader = SafetensorsReader(d)
    out["qwen3_pp2_bf16"] = {
        "names": sorted(exported),
        "hf_names": sorted(reader.files),
        "dtypes": sorted({str(t.dtype) for t in exported.values()}),
        "mismatched": [n for n in reader.files if not torch.equal(exported[n], reader.get(n).to(torch.bfloat16))],
    }


def scenario_fused(work: str, out: dict[str, Any]) -> None:
    """``[perf] fused_kernels`` + SDPA at TP=2 against the plain spec (unfused attention, Megatron's norms); then a
    full GRPO step (vs FSDP in the test)."""
    from megatron.core import parallel_state as ps

    from miles.train.megatron.config import read_hf_arch
    from miles.train.megatron.logprobs import vocab_parallel_logprobs_and_entropy
    from miles.train.megatron.model import build_gpt_model, init_parallel
    from miles.train.megatron.weights import load_hf_weights

    d = os.path.join(work, "qwen3")  # GQA, qk-norm, vocab 95 padded to 96
    arch = read_hf_arch(d)
    ids = torch.randint(0, arch.vocab_size, (2, 12), generator=torch.Generator().manual_seed(9))
    w = torch.randn(2, 2, 11, generator=torch.Generator().manual_seed(10))
    for name, perf in (
        ("plain", PerfConfig(tp=2, attention_backend="unfused", fused_kernels=False)),
        ("fused", PerfConfig(tp=2, attention_backend="sdpa", fused_kernels=True)),
    ):
        mesh = _mesh(perf)
        init_parallel(mesh, 1234)
        model = build_gpt_model(arch, mesh, perf, torch.float32, False, torch.device("cpu"))
        load_hf_weights(model, arch, d)
        logits = model(ids, torch.arange(12).unsqueeze(0).expand(2, -1), None)
        local = logits.shape[-1]
        lp, ent = vocab_parallel_logprobs_and_entropy(
            logits[:, :-1],
            ids[:, 1:],
            vocab_start=ps.get_tensor_model_parallel_rank() * local,
            vocab_size=arch.vocab_size,
            group=ps.get_tensor_model_parallel_group(),
            chunked=perf.fused_kernels,
        )
        (lp * w[0] + ent * w[1]).sum().backward()
        out[name] = {
            "lp": lp.detach(),
            "ent": ent.detach(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "norms": sorted(
                {
                    type(m).__module__ + "." + type(m).__name__
                    for n, m in model.named_modules()
                    if n.endswith("layernorm") and type(m).__name__ != "IdentityOp"
                }
            ),
        }
    scenario_equiv(work, out, PerfConfig(tp=2, attention_backend="sdpa", fused_kernels=True), with_fsdp=False)


def scenario_resume(
    work: str, out: dict[str, Any], ckpt: str, perf: PerfConfig | None = None, no_save_optim: bool = False
) -> None:
    """Megatron (TP=2 unless ``perf``): train, save (dist_checkpointing), train; a fresh actor that loads repeats
    the second train (with ``no_save_optim``: from the same weights and step, Adam's moments restarted)."""
    model_dir = os.path.join(work, "qwen2-tied")
    ctx = TrainerContext(model_dir=model_dir, num_rollout=2, device=torch.device("cpu"))
    spec = megatron_spec(perf or PerfConfig(tp=2))
    spec = dataclasses.replace(spec, ckpt=dataclasses.replace(spec.ckpt, no_save_optim=no_save_optim))
    a = _actor(spec, ctx)
    a.train(_prepare(a, rollout_batch(1)), rollout_id=0)
    if dist.get_rank() == 0:
        os.makedirs(ckpt, exist_ok=True)
    dist.barrier()
    t0 = time.perf_counter()
    a.save(ckpt)
    out["save_s"] = time.perf_counter() - t0
    out["files"] = sorted(os.listdir(ckpt))
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


def scenario_offload(work: str, out: dict[str, Any]) -> None:
    """Release every storage (weights, grads, AdamW state, reference) and restore it: training is unchanged.

    On CPU ``offload()`` is a no-op, so the storage mechanism behind it is driven directly.
    """
    model_dir = os.path.join(work, "qwen2-tied")
    ctx = TrainerContext(model_dir=model_dir, num_rollout=2, device=torch.device("cpu"))
    spec = megatron_spec(PerfConfig(tp=2))
    runs = []
    for offload in (False, True):
        actor = _actor(spec, ctx)
        actor.train(_prepare(actor, rollout_batch(1)), rollout_id=0)  # AdamW state exists from here on
        if offload:
            actor._release_storages()
            out["freed_bytes"] = [p.untyped_storage().nbytes() for p in actor.model.module.parameters()]
            out["released"] = len(actor._offloaded)
            actor._restore_storages()
        metrics = actor.train(_prepare(actor, rollout_batch(2)), rollout_id=1)
        runs.append((metrics, _weights(actor)))
    out["runs"] = runs


def main() -> None:
    out_dir, work = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:
        write_tiny_qwen2(os.path.join(work, "qwen2-tied"))
        write_family(os.path.join(work, "qwen3_moe-96"), "qwen3_moe", vocab=96)  # the rollouts' vocabulary
        for family in FAMILY_CONFIGS:
            write_family(os.path.join(work, family), family)
    dist.barrier()
    for scenario in sys.argv[3:]:
        out: dict[str, Any] = {}
        t0 = time.perf_counter()
        if scenario == "equiv_tp2":
            scenario_equiv(work, out, PerfConfig(tp=2))
        elif scenario == "equiv_pp2":
            scenario_equiv(work, out, PerfConfig(pp=2))
        elif scenario == "equiv_cp2":  # context parallelism: miles' attention over the CP group
            scenario_equiv(work, out, PerfConfig(cp=2, attention_backend="sdpa"))
        elif scenario == "equiv_tp2cp2":  # 4 ranks: CP with TP and sequence parallelism
            scenario_equiv(work, out, PerfConfig(tp=2, cp=2, sequence_parallel=True, attention_backend="sdpa"))
        elif scenario == "equiv_pp2cp2":  # 4 ranks: CP with pipeline stages
            scenario_equiv(work, out, PerfConfig(pp=2, cp=2, attention_backend="sdpa"))
        elif scenario == "equiv_sp":  # sequence parallelism on the local spec
            scenario_equiv(work, out, PerfConfig(tp=2, sequence_parallel=True))
        elif scenario == "equiv_moe_sp":  # MoE under TP needs sequence parallelism; experts split over TP (etp = tp)
            scenario_equiv(work, out, PerfConfig(tp=2, sequence_parallel=True), model="qwen3_moe-96")
        elif scenario == "packing":
            scenario_packing(work, out)
        elif scenario == "fused":
            scenario_fused(work, out)
        elif scenario == "roundtrip":
            scenario_roundtrip(work, out)
        elif scenario == "offload":
            scenario_offload(work, out)
        elif scenario == "resume":
            scenario_resume(work, out, os.path.join(work, "ckpt"))
        elif scenario == "resume_no_optim":  # [ckpt] no_save_optim: weights and step only
            scenario_resume(work, out, os.path.join(work, "ckpt-no-optim"), no_save_optim=True)
        elif scenario == "resume_cp2":  # the checkpoint of a context-parallel actor
            scenario_resume(work, out, os.path.join(work, "ckpt-cp2"), PerfConfig(cp=2, attention_backend="sdpa"))
        else:
            raise SystemExit(f"unknown scenario {scenario}")
        out["wall_s"] = time.perf_counter() - t0
        if rank == 0:
            torch.save(out, os.path.join(out_dir, f"{scenario}.pt"))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
