"""The FSDP2 actor: an HF causal LM sharded with ``fully_shard`` over the trainer ranks.

Data parallel only (``[perf] backend = "fsdp"``): every decoder layer and the
root are their own FSDP unit, parameters are fp32 master weights sharded over
the DP ranks, and with ``[model] dtype`` bfloat16/float16 the forward and
backward run in that dtype (``MixedPrecisionPolicy``) with gradients reduced
in fp32. Works on CPU over gloo (world size >= 1) and on GPUs over NCCL.

Micro-batches are packed by default (``[train] qkv_format = "thd"``): one row
of back-to-back sequences with restarting position ids (RoPE restarts per
sequence) and no attention mask; the models are loaded with miles' attention
implementation (:mod:`miles.train.hf_attention`), which attends each sequence
causally to itself with :mod:`miles.train.document_attention`'s kernels instead
of building a ``[t, t]`` mask. ``"bshd"`` right-pads them instead, and those
rows run transformers' SDPA path unchanged.

Determinism: given the same weights, optimizer state, step counter and batch,
a step is a fixed sequence of ops (no dropout draws: HF configs of the
supported families have zero dropout, the micro-batch plan is a pure
function of the batch), so :meth:`FSDPActor.load` followed by
:meth:`FSDPActor.train` is bit-identical to an uninterrupted run on CPU. On
CUDA that additionally needs ``torch.use_deterministic_algorithms(True)``
(embedding backward uses atomics), which the loop may set process-wide.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from miles.algo.loss import logprobs_and_entropy
from miles.errors import UserError
from miles.model.checkpoint_names import to_checkpoint_names
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
from miles.train.hf_attention import packed_forward_kwargs, register
from miles.train.hf_checkpoint import save_hf_checkpoint
from miles.train.optim import build_adamw, lr_at

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_hf_model(model_dir: str, *, trust_remote_code: bool = False) -> torch.nn.Module:
    """An HF causal LM from a directory, in fp32 on the CPU (FSDP moves the shards to the device), with miles'
    attention implementation (SDPA for padded rows, per-document attention for packed ones)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per rank and model drowns the run's log
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code, attn_implementation=register()
        )
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load an HF causal LM from {model_dir!r} ([model] hf_checkpoint): {e}") from e
    return model


def shard_model(model: torch.nn.Module, mesh: DeviceMesh, mp: MixedPrecisionPolicy | None) -> FSDPModule:
    """``fully_shard`` each decoder layer (the model's ``_no_split_modules`` classes), then the root."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    kwargs: dict[str, Any] = {"mesh": mesh}
    if mp is not None:
        kwargs["mp_policy"] = mp
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    assert isinstance(model, FSDPModule)
    return model


class FSDPActor:
    """:class:`miles.train.actor.Actor` on FSDP2. Construct it on every trainer rank."""

    def __init__(self, cfg: ActorConfig, ctx: TrainerContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        group = ctx.group if ctx.group is not None else dist.group.WORLD
        assert group is not None, "torch.distributed must be initialised before building the actor"
        self.group = group
        self.dp_rank = dist.get_rank(self.group)
        self.dp_size = dist.get_world_size(self.group)
        self.device = ctx.device
        self.param_dtype = DTYPES[cfg.dtype]
        self.total_steps = ctx.num_rollout * cfg.steps_per_rollout
        self.packed = cfg.train.qkv_format == "thd"
        mesh = DeviceMesh.from_group(self.group, device_type=self.device.type)
        mp = None
        if self.param_dtype != torch.float32:
            mp = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)

        # No RNG is drawn here or in training (weights come from disk, no dropout): the loop owns the RNG state.
        hf = load_hf_model(ctx.model_dir, trust_remote_code=cfg.trust_remote_code)
        self.hf_config = hf.config
        self.pad_id = int(getattr(hf.config, "pad_token_id", None) or 0)
        self.model = shard_model(hf, mesh, mp)
        self._module(self.model).train()
        self.ref: FSDPModule | None = None
        if needs_reference(cfg.grpo):
            ref = load_hf_model(reference_dir(cfg.ref_load, ctx.model_dir), trust_remote_code=cfg.trust_remote_code)
            ref.requires_grad_(False)
            ref.eval()
            self.ref = shard_model(ref, mesh, mp)
        self.optimizer = build_adamw(cfg.optimizer, self._module(self.model).named_parameters())
        self._step = 0
        if self.dp_rank == 0:
            n_params = sum(p.numel() for p in self._module(self.model).parameters())
            log.info(
                "FSDP actor: %s (%.1fM params) on %d %s rank(s), compute dtype %s, reference %s",
                ctx.model_dir,
                n_params / 1e6,
                self.dp_size,
                self.device.type,
                cfg.dtype,
                "on" if self.ref is not None else "off",
            )

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _module(m: FSDPModule) -> torch.nn.Module:
        assert isinstance(m, torch.nn.Module)
        return m

    def _forward(self, model: FSDPModule, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Response-token log-probs and entropies ``[B, R]`` in fp32; the LM head runs only where logits are read:
        padded rows from the first response position on, a packed row at its response positions only (its other
        documents' prompts sit between them).
        """
        if mb.packed:
            # Restarting positions restart RoPE per document; the documents reach every layer's attention, which
            # attends within each one (miles.train.hf_attention), and no mask is built.
            assert mb.seq_lens is not None
            keep_pos = torch.unique(mb.logit_pos)  # sorted row positions whose logits are read
            out = self._module(model)(
                input_ids=mb.input_ids,
                position_ids=mb.position_ids,
                use_cache=False,
                logits_to_keep=keep_pos,
                **packed_forward_kwargs(mb.seq_lens, mb.input_ids.device),
            )
            sel = out.logits[0][torch.searchsorted(keep_pos, mb.logit_pos)]  # [1, K, V] -> [B, R, V]
        else:
            first = mb.first_logit_pos
            keep = mb.input_ids.shape[1] - first
            pos = (mb.logit_pos - first).clamp(min=0)
            out = self._module(model)(
                input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False, logits_to_keep=keep
            )
            logits = out.logits  # [B, keep, V]
            sel = torch.gather(logits, 1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        return logprobs_and_entropy(sel, mb.targets, self.cfg.temperature)

    def _collate(self, batch: RolloutBatch, indices: list[int]) -> MicroBatch:
        """Micro-batch ``indices`` in the layout of ``[train] qkv_format``, on the device."""
        if self.packed:
            return pack(batch, indices, self.pad_id).to(self.device)
        return collate(batch, indices, self.pad_id).to(self.device)

    def _micro_batch_plan(self, per_rank: list[list[int]], batch: RolloutBatch) -> list[list[list[int]]]:
        t = self.cfg.train
        lengths = [batch.seq_len(i) for i in range(len(batch))]
        max_tokens = t.max_tokens_per_gpu if t.use_dynamic_batch_size else None
        return plan_micro_batches(
            per_rank, lengths, micro_batch_size=t.micro_batch_size, max_tokens=max_tokens, packed=self.packed
        )

    @property
    def step(self) -> int:
        return self._step

    # -- Actor API -----------------------------------------------------------------------------
    @torch.no_grad()
    def compute_logprobs(self, batch: RolloutBatch, *, model: Literal["actor", "ref"] = "actor") -> list[torch.Tensor]:
        """See :meth:`miles.train.actor.Actor.compute_logprobs`; each rank scores its slice, then all-gather."""
        net = self.model if model == "actor" else self.ref
        if net is None:
            raise RuntimeError("no reference model: enable [grpo] use_kl_loss or kl_coef to build one")
        per_rank = rank_slices(batch, list(range(len(batch))), self.dp_size, self.cfg.train)
        plan = self._micro_batch_plan(per_rank, batch)[self.dp_rank]
        local: list[tuple[int, torch.Tensor]] = []
        for mb_idx in plan:
            mb = self._collate(batch, mb_idx)
            lp, _ = self._forward(net, mb)
            lp = lp.to("cpu", torch.float32)  # one transfer per micro-batch
            for k, i in enumerate(mb_idx):
                local.append((i, lp[k, : batch.response_lens[i]].clone()))
        gathered: list[Any] = [None] * self.dp_size
        dist.all_gather_object(gathered, local, group=self.group)
        return assemble(gathered, len(batch))

    def train(self, batch: RolloutBatch, rollout_id: int) -> list[StepMetrics]:
        """See :meth:`miles.train.actor.Actor.train`."""
        t = self.cfg.train
        assert t.global_batch_size is not None and t.num_steps_per_rollout is not None
        check_trainable(batch, t, self.cfg.loss)
        results = []
        for idx in step_indices(len(batch), t.global_batch_size, t.num_steps_per_rollout):
            results.append(self._optimizer_step(batch, idx, rollout_id))
        return results

    def _optimizer_step(self, batch: RolloutBatch, idx: list[int], rollout_id: int) -> StepMetrics:
        t0 = time.perf_counter()
        per_rank = rank_slices(batch, idx, self.dp_size, self.cfg.train)
        plan = self._micro_batch_plan(per_rank, batch)[self.dp_rank]
        global_tokens = float(sum(float(batch.loss_masks[i].sum()) for i in idx))
        module = self._module(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        n_tokens = 0
        # Gradients are reduce-scattered after every micro-batch (FSDP's default): they stay sharded, so
        # memory does not grow with the model as it would with unsharded accumulation.
        for mb_idx in plan:
            mb = self._collate(batch, mb_idx)
            lp, ent = self._forward(self.model, mb)
            if not mb_idx:  # a dummy micro-batch keeps FSDP's collectives in step with the other ranks
                (lp.sum() * 0.0).backward()
                continue
            n_tokens += int(mb.attention_mask.sum())
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
            # FSDP averages gradients over the DP ranks; the weights already divide by the global count.
            (loss * self.dp_size).backward()
            for name, v in metrics.items():
                if name.endswith("_max"):
                    sums[name] = torch.maximum(sums[name], v) if name in sums else v
                elif name.endswith("_min"):
                    sums[name] = torch.minimum(sums[name], v) if name in sums else v
                else:
                    sums[name] = sums[name] + v if name in sums else v

        clip = self.cfg.optimizer.clip_grad
        params = [p for p in module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=clip if clip > 0 else math.inf)
        grad_norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        lr = lr_at(self.cfg.optimizer, self._step, self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self._step += 1

        out = self._reduce_metrics(sums, n_tokens)
        out.update(
            grad_norm=grad_norm,
            lr=lr,
            step=float(self._step),
            rollout_id=float(rollout_id),
            step_time_s=time.perf_counter() - t0,
        )
        return out

    def _reduce_metrics(self, sums: dict[str, torch.Tensor], n_tokens: int) -> StepMetrics:
        names = sorted(n for n in sums if not n.endswith(("_max", "_min")))
        vec = torch.stack(
            [sums[n].to(self.device, torch.float64) for n in names]
            + [torch.tensor(float(n_tokens), dtype=torch.float64, device=self.device)]
        )
        dist.all_reduce(vec, group=self.group)
        out = {n: float(v) for n, v in zip(names, vec[:-1].tolist(), strict=True)}
        out["train_tokens"] = float(vec[-1])
        for suffix, op in (("_max", dist.ReduceOp.MAX), ("_min", dist.ReduceOp.MIN)):
            for n in sorted(n for n in sums if n.endswith(suffix)):
                v = sums[n].to(self.device, torch.float64).reshape(1)
                dist.all_reduce(v, op=op, group=self.group)
                out[n] = float(v)
        return out

    def named_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """See :meth:`miles.train.actor.Actor.named_hf_weights`; tied weights appear once, under their first name.

        Names are checkpoint names: a family that transformers loads into fused
        parameters (Qwen3-MoE experts) is split back, as ``save_pretrained`` does.
        """

        module = self._module(self.model)
        self._reshard(self.model)
        yield from to_checkpoint_names(module, self._model_named_weights(module))

    def _model_named_weights(self, module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """Full tensors under the model's own names, parameters then persistent buffers (collective)."""
        for name, p in module.named_parameters():
            yield name, self._full(p)
        for mod_name, mod in module.named_modules():
            for b_name, b in mod.named_buffers(recurse=False):
                if b_name in getattr(mod, "_non_persistent_buffers_set", set()) or b is None:
                    continue
                yield (f"{mod_name}.{b_name}" if mod_name else b_name), self._full(b)

    def _full(self, t: torch.Tensor) -> torch.Tensor:
        full = t.full_tensor() if isinstance(t, DTensor) else t
        return full.detach().to(self.param_dtype)

    def save_hf(self, out_dir: str) -> None:
        """See :meth:`miles.train.actor.Actor.save_hf`."""
        save_hf_checkpoint(self.named_hf_weights(), out_dir, self.ctx.model_dir, self.group)

    @staticmethod
    def _reshard(model: FSDPModule) -> None:
        """Back to sharded DTensor parameters: the root FSDP unit keeps its parameters gathered after a forward."""
        for m in FSDPActor._module(model).modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    @torch.no_grad()
    def update_ref(self) -> None:
        if self.ref is None:
            return
        self._reshard(self.model)
        self._reshard(self.ref)
        for p_ref, p in zip(self._module(self.ref).parameters(), self._module(self.model).parameters(), strict=True):
            p_ref.copy_(p)

    def offload(self) -> None:
        """See :meth:`miles.train.actor.Actor.offload`: sharded weights and optimizer state move to host memory."""
        if self.device.type != "cuda":
            return
        self.optimizer.zero_grad(set_to_none=True)  # gradients are dead after the step; train() zeroes them anyway
        self._move(torch.device("cpu"))
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()

    def onload(self) -> None:
        """See :meth:`miles.train.actor.Actor.onload`."""
        if self.device.type != "cuda":
            return
        self._move(self.device)
        torch.cuda.synchronize(self.device)

    def _move(self, device: torch.device) -> None:
        # FSDP2 re-points its sharded storage on Module.to(), so the next all-gather reads the moved shards;
        # resharding first drops any gathered copy the root unit kept after a forward.
        for net in (self.model, self.ref):
            if net is not None:
                self._reshard(net)
                self._module(net).to(device)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    state[key] = value.to(device, non_blocking=True)

    def _state(self, *, optim: bool, ref: bool) -> dict[str, Any]:
        module = self._module(self.model)
        state: dict[str, Any] = {"step": torch.tensor(self._step)}
        if optim:
            state["model"], state["optim"] = get_state_dict(module, self.optimizer)
        else:
            state["model"] = get_model_state_dict(module)
        if ref and self.ref is not None:
            state["ref"] = get_model_state_dict(self._module(self.ref))
        return state

    def _ref_is_state(self) -> bool:
        """The reference changes during the run only with ``ref_update_interval``; otherwise it is the initial
        weights.
        """
        return self.ref is not None and self.cfg.grpo.ref_update_interval is not None

    def save(self, path: str) -> None:
        """See :meth:`miles.train.actor.Actor.save`: one DCP checkpoint of model, optimizer and step.

        The reference is saved only when ``ref_update_interval`` moves it (otherwise it is rebuilt from
        ``ref_load`` or the initial weights); the optimizer is left out with ``[ckpt] no_save_optim``.
        """
        state = self._state(optim=self.cfg.save_optim, ref=self._ref_is_state())
        dcp.save(state, checkpoint_id=path, process_group=self.group)

    def load(self, path: str) -> None:
        """See :meth:`miles.train.actor.Actor.load`; a checkpoint without optimizer state restarts Adam's moments."""
        saved = {key.split(".", 1)[0] for key in dcp.FileSystemReader(path).read_metadata().state_dict_metadata}
        state = self._state(optim="optim" in saved, ref="ref" in saved)
        dcp.load(state, checkpoint_id=path, process_group=self.group)
        module = self._module(self.model)
        if "optim" in state:
            set_state_dict(module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            log.warning("%s holds no optimizer state ([ckpt] no_save_optim): Adam restarts from zero moments", path)
            set_model_state_dict(module, state["model"])
        if "ref" in state and self.ref is not None:
            set_model_state_dict(self._module(self.ref), state["ref"])
        self._step = int(state["step"])
