"""The Megatron-core actor: :class:`miles.train.actor.Actor` with TP, PP, CP and EP.

One ``GPTModel`` pipeline stage per rank, built from the HF directory
(:mod:`.model`), wrapped in Megatron's ``DistributedDataParallel``. Every
forward/backward goes through Megatron's pipeline schedules
(``get_forward_backward_func``), so PP=1 and PP>1 run one code path.

Loss normalisation is miles' own (:func:`miles.algo.loss.token_weights`
divides by counts over the global batch), so Megatron must not rescale:
``calculate_per_token_loss`` is on, the loss function reports zero tokens
(no division in ``finalize_model_grads``) and DDP then sums gradients over DP
ranks, which adds the micro-batch shares up to the global loss.

Sequence packing (``[train] qkv_format = "thd"``, without CP): a micro-batch
is one row of back-to-back sequences with megatron-core's ``thd`` parameters
(:func:`miles.train.megatron.attention.document_params`), so RoPE restarts and
attention stays within each sequence; the response logits are picked from the
row at each sequence's offset. Under CP (and with Megatron's unfused local
attention) micro-batches are padded (:func:`.config.packs_sequences`).

Context parallelism (:mod:`.context`): each micro-batch is right-padded to a
length that splits into ``2 * cp`` chunks (times TP under sequence
parallelism) and every CP rank feeds the model its two chunks. The per-token
log-probs and entropies of all CP ranks are gathered before the loss, so the
loss code sees whole sequences, exactly as without CP.

Optimizer: on GPUs Megatron's distributed optimizer (fp32 master weights
sharded over DP, global-norm clipping across TP/PP/EP). On CPUs (CI) that
wrapper cannot run (it asserts CUDA tensors), so the same AdamW as the FSDP
backend (:func:`miles.train.optim.build_adamw`) steps on ``main_grad`` with a
TP/PP-aware gradient norm.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from functools import partial
from typing import Any, Literal

import torch
import torch.distributed as dist

from miles.errors import UserError
from miles.train.actor import ActorConfig, StepMetrics, TrainerContext, needs_reference, reference_dir
from miles.train.batch import (
    MicroBatch,
    RolloutBatch,
    assemble,
    check_trainable,
    collate,
    micro_batch_loss,
    pack,
    plan_micro_batches,
    rank_slices,
    step_indices,
)
from miles.train.hf_checkpoint import save_hf_checkpoint
from miles.train.megatron.config import (
    DTYPES,
    check_runtime,
    megatron_optimizer_config,
    packs_sequences,
    read_hf_arch,
    te_available,
)
from miles.train.megatron.context import ContextLayout
from miles.train.megatron.logprobs import vocab_parallel_logprobs_and_entropy
from miles.train.megatron.mapping import param_rules
from miles.train.megatron.model import build_gpt_model, init_parallel
from miles.train.megatron.weights import export_hf_weights, load_hf_weights, local_parameters
from miles.train.optim import build_adamw, lr_at

_OPTIMIZER_CKPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
"""How the distributed optimizer's state goes into dist_checkpointing (see :meth:`MegatronActor._sharded_state`)."""
log = logging.getLogger(__name__)
_NO_OPTIMIZER = "no_optimizer"
"""Marker file in a checkpoint saved with ``[ckpt] no_save_optim``: the optimizer's state is not in it."""


class MegatronActor:
    """:class:`miles.train.actor.Actor` on megatron-core. Construct it on every trainer rank."""

    def __init__(self, cfg: ActorConfig, ctx: TrainerContext) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        if ctx.group is not None and dist.get_world_size(ctx.group) != dist.get_world_size():
            raise UserError(
                "the Megatron backend builds its TP/PP/DP groups over the whole torch.distributed world; "
                "start the trainers in their own world (engines outside it)"
            )
        if ctx.device.type != "cuda" and not getattr(torch.cuda, "miles_cpu_shim", False):
            raise UserError(
                '[perf] backend = "megatron" needs CUDA GPUs (megatron-core calls CUDA for devices, RNG and '
                'streams); on CPUs use backend = "fsdp" (miles\' own CPU tests run Megatron through a test-only shim)'
            )
        if ctx.mesh is None:
            raise ValueError("the Megatron actor trains on the planner's mesh: set TrainerContext.mesh")
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        self.arch = read_hf_arch(ctx.model_dir)
        self.use_te = te_available()
        # The planner's mesh, checked by its rules against this model (each layout rule lives there only).
        self.mesh = ctx.mesh
        check_runtime(cfg.perf, self.use_te)
        init_parallel(self.mesh, cfg.seed)
        self.dtype = DTYPES[cfg.dtype]
        self.on_cuda = self.device.type == "cuda"
        self.total_steps = ctx.num_rollout * cfg.steps_per_rollout
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.last_stage = ps.is_pipeline_last_stage()
        self.cp = ContextLayout.current()
        # Sequence parallelism splits each CP rank's tokens over TP: its length must divide by tp too.
        self.seq_multiple = self.mesh.tp if cfg.perf.sequence_parallel else 1
        self.pad_id = 0
        qkv_format = cfg.train.qkv_format
        self.packed = packs_sequences(qkv_format, cfg.perf.attention_backend, self.mesh.cp, self.use_te)
        if qkv_format == "thd" and not self.packed and dist.get_rank() == 0:
            log.info(
                "[train] qkv_format = thd: micro-batches are padded on this layout (context parallelism, or "
                "Megatron's unfused attention without Transformer Engine has no packed path)"
            )

        model = self._build()
        self.ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=self.on_cuda
        )
        self.model = DistributedDataParallel(config=model.config, ddp_config=self.ddp_config, module=model)
        model.config.no_sync_func = self.model.no_sync
        model.config.finalize_model_grads_func = finalize_model_grads
        self.ref: Any = None
        if needs_reference(cfg.grpo):
            self.ref = self._build(reference_dir(cfg.ref_load, ctx.model_dir))
            self.ref.requires_grad_(False)
            self.ref.eval()
        self.optimizer: Any
        if self.on_cuda:
            from megatron.core.optimizer import get_megatron_optimizer

            self.optimizer = get_megatron_optimizer(
                megatron_optimizer_config(cfg.optimizer, self.dtype, distributed=True), [self.model]
            )
            if cfg.perf.fused_kernels:
                _fuse_adam(self.optimizer)
        else:
            self.optimizer = build_adamw(cfg.optimizer, self.model.module.named_parameters())
        self._step = 0

    def _build(self, model_dir: str | None = None) -> Any:
        model = build_gpt_model(self.arch, self.mesh, self.cfg.perf, self.dtype, self.use_te, self.device)
        load_hf_weights(model, self.arch, model_dir or self.ctx.model_dir)
        return model

    @property
    def step(self) -> int:
        return self._step

    # -- forward -------------------------------------------------------------------------------
    def _micro_batches(self, batch: RolloutBatch, idx: list[int]) -> list[list[int]]:
        t = self.cfg.train
        lengths = [batch.seq_len(i) for i in range(len(batch))]
        # A micro-batch's tokens are spread over the CP group: each GPU holds 1/cp of them.
        max_tokens = t.max_tokens_per_gpu * self.cp.size if t.use_dynamic_batch_size and t.max_tokens_per_gpu else None
        per_rank = rank_slices(batch, idx, self.dp_size, t)
        plans = plan_micro_batches(
            per_rank, lengths, micro_batch_size=t.micro_batch_size, max_tokens=max_tokens, packed=self.packed
        )
        return plans[self.dp_rank]

    def _collate(self, batch: RolloutBatch, indices: list[int]) -> MicroBatch:
        """Micro-batch ``indices`` packed (its row a multiple of TP under sequence parallelism) or padded."""
        if self.packed:
            return pack(batch, indices, self.pad_id, self.seq_multiple).to(self.device)
        return collate(batch, indices, self.pad_id).to(self.device)

    def _padded_ids(self, mb: MicroBatch) -> torch.Tensor:
        """``mb.input_ids`` right-padded to a length the CP chunks (and sequence parallelism) divide."""
        s = mb.input_ids.shape[1]
        extra = self.cp.padded_length(s, self.seq_multiple) - s
        return torch.nn.functional.pad(mb.input_ids, (0, extra), value=self.pad_id) if extra else mb.input_ids

    def _token_stats(self, output: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Response-token log-probs and entropies ``[B, R]`` from this rank's vocabulary slice of the logits.

        Without CP only the response positions' logits are used. Under CP this
        rank holds logits of its own chunks only: their next-token log-probs
        and entropies are computed for every position, gathered over the CP
        group into whole sequences, and the response positions picked from those.
        """
        local_vocab = output.shape[-1]
        kw: dict[str, Any] = dict(
            vocab_start=self.tp_rank * local_vocab,
            vocab_size=self.arch.vocab_size,
            temperature=self.cfg.temperature,
            group=self.tp_group,
            chunked=self.cfg.perf.fused_kernels,
        )
        if mb.packed:  # one row [1, T, V/tp]: each sample's response logits sit at its offset in the row
            return vocab_parallel_logprobs_and_entropy(output[0][mb.logit_pos], mb.targets, **kw)
        if self.cp.size == 1:
            sel = torch.gather(output, 1, mb.logit_pos.unsqueeze(-1).expand(-1, -1, local_vocab))
            return vocab_parallel_logprobs_and_entropy(sel, mb.targets, **kw)
        ids = self._padded_ids(mb)
        next_ids = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=self.pad_id)
        lp, ent = vocab_parallel_logprobs_and_entropy(output, self.cp.split(next_ids, dim=1), **kw)
        lp, ent = self.cp.gather_token_stats(lp, dim=1), self.cp.gather_token_stats(ent, dim=1)
        return torch.gather(lp, 1, mb.logit_pos), torch.gather(ent, 1, mb.logit_pos)

    def _run(self, net: Any, mbs: list[MicroBatch], loss_fn: Any, forward_only: bool) -> list[dict[str, Any]]:
        """One pass of Megatron's schedule over ``mbs``; returns the loss function's dicts (last stage only)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        it = iter(mbs)

        def forward_step(data_iterator: Iterator[MicroBatch], model: Any) -> tuple[torch.Tensor, Any]:
            mb = next(data_iterator)
            if mb.packed:
                from miles.train.megatron.attention import document_params  # deferred: imports megatron-core

                assert mb.seq_lens is not None and mb.position_ids is not None
                params = document_params(mb.seq_lens, self.device)
                out = model(mb.input_ids, mb.position_ids, None, packed_seq_params=params)
                return out, partial(loss_fn, mb)
            ids = self._padded_ids(mb)
            b, s = ids.shape
            pos = torch.arange(s, device=self.device).unsqueeze(0).expand(b, -1)
            out = model(self.cp.split(ids, dim=1), self.cp.split(pos, dim=1), None)
            return out, partial(loss_fn, mb)

        # The longest (padded) micro-batch; Megatron divides it by cp (and tp under SP) for the PP messages.
        seq = max(self.cp.padded_length(int(mb.input_ids.shape[1]), self.seq_multiple) for mb in mbs)
        store = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=it,
            model=[net],
            num_microbatches=len(mbs),
            seq_length=seq,
            micro_batch_size=max(int(mb.input_ids.shape[0]) for mb in mbs),
            forward_only=forward_only,
        )
        return list(store) if self.last_stage else []

    def _zero_tokens(self) -> torch.Tensor:
        return torch.zeros([], dtype=torch.int, device=self.device)

    # -- Actor API -----------------------------------------------------------------------------
    @torch.no_grad()
    def compute_logprobs(self, batch: RolloutBatch, *, model: Literal["actor", "ref"] = "actor") -> list[torch.Tensor]:
        """See :meth:`miles.train.actor.Actor.compute_logprobs`."""
        net = self.model if model == "actor" else self.ref
        if net is None:
            raise RuntimeError("no reference model: enable [grpo] use_kl_loss or kl_coef to build one")
        plan = self._micro_batches(batch, list(range(len(batch))))
        mbs = [self._collate(batch, idx) for idx in plan]

        def loss_fn(mb: MicroBatch, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
            lp, _ = self._token_stats(output, mb)
            rows = [(i, lp[k, : batch.response_lens[i]].to("cpu", torch.float32)) for k, i in enumerate(mb.indices)]
            return lp.sum() * 0.0, self._zero_tokens(), {"rows": rows}

        was_training = net.training
        net.eval()
        store = self._run(net, mbs, loss_fn, forward_only=True)
        net.train(was_training)
        mine = [row for d in store for row in d["rows"]] if self.tp_rank == 0 and self.cp.rank == 0 else []
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        return assemble(gathered, len(batch))

    def train(self, batch: RolloutBatch, rollout_id: int) -> list[StepMetrics]:
        """See :meth:`miles.train.actor.Actor.train`."""
        t = self.cfg.train
        assert t.global_batch_size is not None and t.num_steps_per_rollout is not None
        check_trainable(batch, t, self.cfg.loss)
        return [
            self._optimizer_step(batch, idx, rollout_id)
            for idx in step_indices(len(batch), t.global_batch_size, t.num_steps_per_rollout)
        ]

    def _optimizer_step(self, batch: RolloutBatch, idx: list[int], rollout_id: int) -> StepMetrics:
        t0 = time.perf_counter()
        plan = self._micro_batches(batch, idx)
        mbs = [self._collate(batch, i) for i in plan]
        global_tokens = float(sum(float(batch.loss_masks[i].sum()) for i in idx))

        def loss_fn(mb: MicroBatch, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
            lp, ent = self._token_stats(output, mb)
            if not mb.indices:  # a dummy micro-batch keeps the collectives in step with the other DP ranks
                return lp.sum() * 0.0, self._zero_tokens(), {"metrics": {}, "tokens": 0}
            loss, metrics = micro_batch_loss(
                self.cfg.loss,
                self.cfg.aggregation,
                mb,
                lp,
                ent,
                global_tokens=global_tokens,
                global_samples=len(idx),
                max_response_len=self.cfg.max_response_len,
            )
            # kept on the device: one host read per optimizer step (_reduce_metrics), not one per micro-batch,
            # which would stall the launch of each micro-batch's backward until its forward had finished
            tokens = mb.attention_mask.sum()
            return loss, self._zero_tokens(), {"metrics": {k: v.detach() for k, v in metrics.items()}, "tokens": tokens}

        self.model.zero_grad_buffer()
        if self.on_cuda:
            self.optimizer.zero_grad()
        store = self._run(self.model, mbs, loss_fn, forward_only=False)
        lr = lr_at(self.cfg.optimizer, self._step, self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if self.on_cuda:
            ok, grad_norm, _ = self.optimizer.step()
            if not ok:
                raise RuntimeError("Megatron optimizer step was skipped (non-finite gradients)")
        else:
            grad_norm = self._cpu_step()
        self._step += 1
        out = self._reduce_metrics(store)
        out.update(
            grad_norm=float(grad_norm or 0.0),
            lr=lr,
            step=float(self._step),
            rollout_id=float(rollout_id),
            step_time_s=time.perf_counter() - t0,
        )
        return out

    def _cpu_step(self) -> float:
        """AdamW on ``main_grad`` with the global gradient norm: each slice counted once over TP/PP/EP."""
        from megatron.core import parallel_state as ps

        rules = {r.mcore: r for r in param_rules(self.arch)}
        etp_rank = ps.get_expert_tensor_parallel_rank() if self.arch.num_experts else 0
        dense_sq = torch.zeros((), dtype=torch.float64)
        expert_sq = torch.zeros((), dtype=torch.float64)
        params = []
        for name, p in local_parameters(self.model.module, self.arch).items():
            if not p.requires_grad:
                continue
            params.append(p)
            p.grad = p.main_grad.to(p.dtype)  # type: ignore[attr-defined]  # Megatron DDP's gradient buffer view
            rule = rules.get(name)
            if rule is None:  # the tied output layer's copy on the last stage: counted with the embedding
                continue
            first = (etp_rank if rule.expert is not None else self.tp_rank) == 0
            if rule.kind == "replicated" and not first:
                continue
            sq = p.grad.to(torch.float64).pow(2).sum()
            if rule.expert is not None:
                expert_sq += sq
            else:
                dense_sq += sq
        dist.all_reduce(dense_sq, group=ps.get_model_parallel_group())
        if self.arch.num_experts:
            dist.all_reduce(expert_sq, group=ps.get_expert_tensor_model_pipeline_parallel_group())
        norm = math.sqrt(float(dense_sq + expert_sq))
        clip = self.cfg.optimizer.clip_grad
        if clip > 0 and norm > clip:
            coeff = clip / (norm + 1e-6)
            for p in params:
                assert p.grad is not None
                p.grad.mul_(coeff)
        self.optimizer.step()
        for p in params:
            p.grad = None
        return norm

    def _reduce_metrics(self, store: list[dict[str, Any]]) -> StepMetrics:
        """Sum the micro-batch metric shares (max/min for ``*_max``/``*_min``) over all DP ranks; same on every rank."""

        mine: dict[str, float] = {}
        tokens = 0
        store = _on_host(store)
        if self.last_stage and self.tp_rank == 0 and self.cp.rank == 0:
            for d in store:
                tokens += d["tokens"]
                for k, v in d["metrics"].items():
                    if k.endswith("_max"):
                        mine[k] = max(mine.get(k, -math.inf), v)
                    elif k.endswith("_min"):
                        mine[k] = min(mine.get(k, math.inf), v)
                    else:
                        mine[k] = mine.get(k, 0.0) + v
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (mine, tokens))
        out: dict[str, float] = {}
        total_tokens = 0
        for part, n in gathered:
            total_tokens += n
            for k, v in part.items():
                if k.endswith("_max"):
                    out[k] = max(out.get(k, -math.inf), v)
                elif k.endswith("_min"):
                    out[k] = min(out.get(k, math.inf), v)
                else:
                    out[k] = out.get(k, 0.0) + v
        out["train_tokens"] = float(total_tokens)
        return out

    # -- weights -------------------------------------------------------------------------------
    def named_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """See :meth:`miles.train.actor.Actor.named_hf_weights`: gathered over TP/EP, sent from each PP stage to
        rank 0.
        """
        return export_hf_weights(self.model.module, self.arch, self.device)

    def save_hf(self, out_dir: str) -> None:
        """Write the current weights as an HF checkpoint (``[ckpt] save_hf``); collective, rank 0 writes."""
        save_hf_checkpoint(self.named_hf_weights(), out_dir, self.ctx.model_dir)

    @torch.no_grad()
    def update_ref(self) -> None:
        if self.ref is None:
            return
        for p_ref, p in zip(self.ref.parameters(), self.model.module.parameters(), strict=True):
            p_ref.copy_(p)

    # -- offload (colocated engines) -------------------------------------------------------------
    def offload(self) -> None:
        """See :meth:`miles.train.actor.Actor.offload`: weights, gradients, optimizer state and reference to host.

        A no-op on CPU. Storage-level, like Megatron's own buffer offload: each
        CUDA storage is copied to host memory and resized to 0 bytes, so every
        view into it (parameters inside DDP's contiguous buffers, the
        distributed optimizer's shards of them, ``main_grad``) stays the same
        Python object and is valid again after :meth:`onload`.
        """
        if self.device.type == "cuda":
            self._release_storages()
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def onload(self) -> None:
        """See :meth:`miles.train.actor.Actor.onload`."""
        if self.device.type == "cuda":
            self._restore_storages()
            torch.cuda.synchronize(self.device)

    def _tensors_to_offload(self) -> Iterator[torch.Tensor]:
        for buffer in self.model.buffers + self.model.expert_parallel_buffers:
            for data in (buffer.param_data, buffer.grad_data):  # param_data exists with the distributed optimizer
                if data is not None:
                    yield data
        yield from self.model.module.parameters()
        if self.ref is not None:
            yield from self.ref.parameters()
        inner = getattr(self.optimizer, "chained_optimizers", None) or [self.optimizer]
        for opt in inner:
            torch_opt = getattr(opt, "optimizer", opt)
            for group in torch_opt.param_groups:
                yield from group["params"]
            for state in torch_opt.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)

    def _release_storages(self) -> None:
        """Copy each distinct storage to host memory and free it on the device (views survive)."""
        self._offloaded: list[tuple[Any, Any]] = []
        seen: set[int] = set()
        for t in self._tensors_to_offload():
            st = t.untyped_storage()
            if st.nbytes() == 0 or st.data_ptr() in seen:
                continue
            seen.add(st.data_ptr())
            host = torch.empty(st.nbytes(), dtype=torch.uint8, pin_memory=self.device.type == "cuda").untyped_storage()
            host.copy_(st)
            self._offloaded.append((st, host))
        for st, _ in self._offloaded:
            st.resize_(0)

    def _restore_storages(self) -> None:
        for st, host in getattr(self, "_offloaded", []):
            st.resize_(host.nbytes())
            st.copy_(host)
        self._offloaded = []

    # -- checkpoints ---------------------------------------------------------------------------
    def _sharded_state(self, is_loading: bool = False, optim: bool = True) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.model.module.sharded_state_dict(prefix="model."), "step": self._step}
        if self.ref is not None:
            state["ref"] = self.ref.sharded_state_dict(prefix="ref.")
        if self.on_cuda and optim:
            # The distributed optimizer's state as its DP-local buckets: written and read by every rank in
            # parallel, reshardable over DP only (a resume keeps the TP/PP/EP layout). Megatron's default
            # ("fully_sharded_model_space") cannot be saved at all with megatron-core 0.19 (its ShardedTensors
            # carry a flattened_range, which 0.19 refuses); "dp_reshardable" exists in 0.16 and 0.19 alike.
            state["optimizer"] = self.optimizer.sharded_state_dict(
                state["model"], is_loading=is_loading, metadata=_OPTIMIZER_CKPT_METADATA
            )
        return state

    def save(self, path: str) -> None:
        """See :meth:`miles.train.actor.Actor.save`: ``megatron.core.dist_checkpointing`` (resharding-capable).

        On CPUs the plain AdamW's state goes to one file per rank next to it
        (resumable with the same mesh only). With ``[ckpt] no_save_optim`` the optimizer is left out and a
        marker file says so, so that a load restores weights and step and restarts Adam's moments.
        """
        from megatron.core import dist_checkpointing

        optim = self.cfg.save_optim
        mdir = os.path.join(path, "megatron")
        if dist.get_rank() == 0:
            os.makedirs(mdir, exist_ok=True)
            if not optim:
                open(os.path.join(path, _NO_OPTIMIZER), "w").close()
        dist.barrier()
        dist_checkpointing.save(self._sharded_state(optim=optim), mdir)
        if optim and not self.on_cuda:
            torch.save(self.optimizer.state_dict(), os.path.join(path, f"adamw.rank{dist.get_rank()}.pt"))
        dist.barrier()

    def load(self, path: str) -> None:
        """Restore what :meth:`save` wrote; a checkpoint without optimizer state restarts Adam's moments."""
        from megatron.core import dist_checkpointing

        optim = not os.path.exists(os.path.join(path, _NO_OPTIMIZER))
        state = dist_checkpointing.load(
            self._sharded_state(is_loading=True, optim=optim), os.path.join(path, "megatron")
        )
        self.model.module.load_state_dict(_strip(state["model"], "model."))
        if self.ref is not None:
            self.ref.load_state_dict(_strip(state["ref"], "ref."))
        if not optim:
            log.warning("%s holds no optimizer state ([ckpt] no_save_optim): Adam restarts from zero moments", path)
        elif self.on_cuda:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.cfg.perf.fused_kernels:
                _fuse_adam(self.optimizer)  # the loaded parameter groups carry the flags they were saved with
        else:
            self.optimizer.load_state_dict(torch.load(os.path.join(path, f"adamw.rank{dist.get_rank()}.pt")))
        self._step = int(state["step"])


def _strip(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def _on_host(store: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The micro-batches' metric and token figures as Python numbers, read from the device in one transfer."""
    tensors = [v for d in store for v in (*d["metrics"].values(), d["tokens"]) if isinstance(v, torch.Tensor)]
    if not tensors:
        return store
    values = iter(torch.stack([t.to(torch.float64) for t in tensors]).tolist())

    def host(v: Any) -> Any:
        return next(values) if isinstance(v, torch.Tensor) else v

    return [{"metrics": {k: host(v) for k, v in d["metrics"].items()}, "tokens": int(host(d["tokens"]))} for d in store]


def _fuse_adam(optimizer: Any) -> None:
    """Step torch's AdamW inside Megatron's optimizer with its fused CUDA kernel (``[perf] fused_kernels``).

    Without Transformer Engine or apex, megatron-core falls back to ``torch.optim.AdamW`` with torch's default
    implementation, ``foreach``: a dozen passes over the fp32 master weights and moments per step. The fused
    kernel makes one. Its step counters live on the GPU (a checkpoint written by the ``foreach`` path keeps
    them on the host, so they are moved).
    """
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            group["fused"], group["foreach"] = True, False
        for p, state in inner.state.items():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.to(device=p.device, dtype=torch.float32)
