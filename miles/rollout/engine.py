"""The embedded engine: batched generation with a KV cache over any HF causal LM directory.

Where SGLang is absent (a laptop, CPU CI, a small GPU job) miles still needs an
inference engine that speaks SGLang's protocol, so that the trainer, the weight
sync and the tests run one code path. This module is the compute half; the
HTTP half is :mod:`miles.rollout.server`.

How it generates: a batch of prompts is left-padded, prefilled in one forward
pass with an attention mask and explicit position ids, then decoded one token
per step for every unfinished row at once through transformers'
``DynamicCache``. Rows that finish are dropped from the cache
(``batch_select_indices``) so the batch only pays for live sequences.

Sampling follows SGLang 0.5.20 (``sglang/srt/layers/sampler.py``):

* temperature < 1e-6 or top_k == 1 is greedy (argmax);
* otherwise probabilities are ``softmax(logits / temperature)``, filtered by
  top_k then top_p, renormalised, and sampled by inverse CDF with one uniform
  draw from the request's own ``torch.Generator`` per token. The generator is
  seeded with ``sampling_seed`` (or a draw from the engine's seeded generator),
  so the same request with the same seed and weights yields the same tokens;
* the returned logprob of each sampled token is ``log softmax(logits /
  temperature)`` over the whole vocabulary, before top-k/top-p renormalisation
  (what SGLang returns by default, i.e. without
  ``SGLANG_RETURN_ORIGINAL_LOGPROB``); greedy rows use temperature 1. This is
  the distribution the trainer recomputes with ``logits / rollout_temperature``.

Bitwise batch invariance is not promised: a row's numbers may differ in the last
bits with the batch it was computed in. A batched ``/generate`` request is run as
one batch, so a client that sends fixed chunks gets reproducible rollouts.
"""

from __future__ import annotations

import hashlib
import inspect
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from miles.rollout.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GenerationRequest:
    """One prompt to complete (``n`` > 1 is expanded by the server before it gets here)."""

    input_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    logprob_start_len: int = -1
    """SGLang's ``logprob_start_len``: -1 returns no prompt logprobs, k >= 0 those of prompt positions k..end."""


@dataclass
class GenerationOutput:
    """What SGLang's /generate reports for one request."""

    output_ids: list[int]
    output_logprobs: list[float]
    finish_reason: dict[str, Any]
    text: str
    input_logprobs: list[float | None] = field(default_factory=list)
    """Logprobs of prompt tokens from ``logprob_start_len`` (the first prompt token has None)."""


class EngineReleased(RuntimeError):
    """Generation was asked for while the engine's memory is released (release_memory_occupation)."""


def tensor_checksum(t: torch.Tensor) -> str:
    """SGLang's weight checksum of one tensor (``weights_checker`` action ``checksum``).

    The first 8 bytes of the SHA-256 of the raw bytes, as 16 hex digits: equal
    checksums mean bit-equal tensors of equal dtype, which is what the weight-sync
    test asserts between the actor and the engines.
    """
    raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{int.from_bytes(hashlib.sha256(raw.tobytes()).digest()[:8], 'big'):016x}"


class Engine:
    """A loaded model plus its tokenizer, generating batches; thread-safe for one generating thread."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        seed: int = 0,
        max_batch_size: int = 64,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        self.model_dir = str(model_dir)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # NCCL weight-update groups use the current device
        self.dtype = DTYPES[dtype]
        self.max_batch_size = max_batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=trust_remote_code)
        model: Any = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=self.dtype, trust_remote_code=trust_remote_code
        )
        self.model = model.to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)
        cfg = self.model.config
        self.config = cfg
        self.vocab_size = int(cfg.vocab_size)
        self.max_context = int(getattr(cfg, "max_position_embeddings", 1 << 30) or 1 << 30)
        self.eos_ids = self._eos_ids()
        # transformers renamed the forward's ``past_key_values`` to ``cache``; use whichever this version has
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0))
        self._seed_gen = torch.Generator().manual_seed(seed)
        self.gate = threading.Event()
        """Cleared by pause_generation (in_place/retract): the generating thread waits at the next step."""
        self.gate.set()
        self.parked = threading.Event()
        """Set while the generating thread waits at the gate (a paused engine may then take new weights)."""
        self.abort = threading.Event()
        """Set by pause_generation (abort): running rows finish at the next step with finish_reason abort."""
        self.released: set[str] = set()
        self._cpu_backup: dict[str, torch.Tensor] = {}

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(i) for i in src)
        gen_cfg = getattr(self.model, "generation_config", None)
        gen_eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, (list, tuple)):
            ids.update(int(i) for i in gen_eos)
        return ids

    # ------------------------------------------------------------------ generation

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        """Generate every request, in batches of at most ``max_batch_size``, in order."""
        if self.released:
            raise EngineReleased(f"engine memory is released ({sorted(self.released)}); call resume_memory_occupation")
        outputs: list[GenerationOutput] = []
        for start in range(0, len(requests), self.max_batch_size):
            outputs.extend(self._generate_batch(list(requests[start : start + self.max_batch_size])))
        return outputs

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def _check_request(self, r: GenerationRequest) -> None:
        if not r.input_ids:
            raise ValueError("input_ids is empty")
        if len(r.input_ids) >= self.max_context:
            raise ValueError(
                f"The input ({len(r.input_ids)} tokens) is longer than the model's context length ({self.max_context} tokens)."
            )
        bad = [t for t in r.input_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"input_ids out of vocabulary range [0, {self.vocab_size}): {bad[:5]}")

    @torch.inference_mode()
    def _generate_batch(self, reqs: list[GenerationRequest]) -> list[GenerationOutput]:
        from transformers import DynamicCache

        for r in reqs:
            self._check_request(r)
        n = len(reqs)
        params = [r.params for r in reqs]
        gens = [
            torch.Generator().manual_seed(
                p.sampling_seed if p.sampling_seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._seed_gen))
            )
            for p in params
        ]
        budget = [min(p.max_new_tokens, self.max_context - len(r.input_ids)) for p, r in zip(params, reqs, strict=True)]
        out_ids: list[list[int]] = [[] for _ in range(n)]
        out_lps: list[list[float]] = [[] for _ in range(n)]
        finish: list[dict[str, Any] | None] = [None] * n
        for i in range(n):
            if budget[i] <= 0:
                finish[i] = {"type": "length", "length": params[i].max_new_tokens}
        stop_window = [max((len(s) for s in p.stop), default=0) + 2 for p in params]

        active = [i for i in range(n) if finish[i] is None]
        input_lps: list[list[float | None]] = [[] for _ in range(n)]
        if not active:
            return self._outputs(reqs, out_ids, out_lps, finish, input_lps)

        lengths = [len(reqs[i].input_ids) for i in active]
        width = max(lengths)
        ids = torch.full((len(active), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(active), width), dtype=torch.long)
        for row, i in enumerate(active):
            ids[row, width - lengths[row] :] = torch.tensor(reqs[i].input_ids)
            mask[row, width - lengths[row] :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        want_input = any(reqs[i].logprob_start_len >= 0 for i in active)
        cache = DynamicCache()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=0 if want_input else 1,
            **{self._cache_kw: cache},
        )
        if want_input:
            full = torch.log_softmax(out.logits.float(), dim=-1)
            for row, i in enumerate(active):
                start = reqs[i].logprob_start_len
                if start < 0:
                    continue
                off = width - lengths[row]
                prompt = reqs[i].input_ids
                lps: list[float | None] = []
                for t in range(start, len(prompt)):
                    lps.append(None if t == 0 else float(full[row, off + t - 1, prompt[t]]))
                input_lps[i] = lps
        logits = out.logits[:, -1, :].float()

        step = 0
        while active:
            if not self.gate.is_set():
                self.parked.set()
                self.gate.wait()
                self.parked.clear()
            if self.abort.is_set():
                for i in active:
                    finish[i] = {"type": "abort", "message": "Abort before prefill" if step == 0 else "Aborted by pause_generation",
                                 "status_code": None, "err_type": None}
                break
            tokens, step_lps = self._sample(logits, [params[i] for i in active], [gens[i] for i in active],
                                       [len(out_ids[i]) for i in active])
            tok_list = tokens.tolist()
            lp_list = step_lps.tolist()
            keep: list[int] = []
            for row, i in enumerate(active):
                tok = tok_list[row]
                out_ids[i].append(tok)
                out_lps[i].append(lp_list[row])
                finish[i] = self._finished(params[i], out_ids[i], budget[i], stop_window[i])
                if finish[i] is None:
                    keep.append(row)
            step += 1
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask = mask.index_select(0, index)
                tokens = tokens.index_select(0, index)
                active = [active[row] for row in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1
            out = self.model(
                input_ids=tokens.view(-1, 1),
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_kw: cache},
            )
            logits = out.logits[:, -1, :].float()
        return self._outputs(reqs, out_ids, out_lps, finish, input_lps)

    def _sample(
        self, logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator], produced: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample one token per row; return the tokens and their logprobs under softmax(logits / T)."""
        n, vocab = logits.shape
        for row, p in enumerate(params):
            if produced[row] < p.min_new_tokens:
                blocked = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_ids))
                if blocked:
                    logits[row, blocked] = float("-inf")
        greedy = [p.greedy for p in params]
        temps = torch.tensor([1.0 if g else p.temperature for g, p in zip(greedy, params, strict=True)], device=logits.device)
        logprobs = torch.log_softmax(logits / temps.unsqueeze(1), dim=-1)
        tokens = torch.argmax(logits, dim=-1)
        sampled_rows = [row for row, g in enumerate(greedy) if not g]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            probs = logprobs.index_select(0, rows).exp()
            sub = [params[r] for r in sampled_rows]
            order: torch.Tensor | None = None
            if any(p.top_k > 0 or p.top_p < 1.0 for p in sub):
                # SGLang's order: top_p on the sorted full distribution, then top_k; no renormalisation
                # is needed because the inverse CDF below scales by the kept mass.
                probs, order = probs.sort(dim=-1, descending=True)
                top_p = torch.tensor([p.top_p for p in sub], device=logits.device, dtype=probs.dtype)
                before = probs.cumsum(-1) - probs
                ks = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in sub], device=logits.device)
                rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
                probs = probs.masked_fill((before > top_p.unsqueeze(1)) | (rank >= ks.unsqueeze(1)), 0.0)
            cdf = probs.cumsum(-1)
            u = torch.tensor([float(torch.rand(1, generator=gens[r])) for r in sampled_rows],
                             device=logits.device, dtype=cdf.dtype)
            pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).clamp(max=vocab - 1)
            # never land on a zero-probability slot through float ties at the boundary
            pick = torch.where(probs.gather(1, pick) > 0, pick, probs.argmax(-1, keepdim=True))
            chosen = order.gather(1, pick) if order is not None else pick
            tokens = tokens.index_copy(0, rows, chosen.view(-1))
        lps = logprobs.gather(1, tokens.view(-1, 1)).view(-1)
        return tokens, lps

    def _finished(self, p: SamplingParams, ids: list[int], budget: int, window: int) -> dict[str, Any] | None:
        tok = ids[-1]
        if len(ids) > p.min_new_tokens or len(ids) == budget:
            if not p.ignore_eos and tok in self.eos_ids:
                return {"type": "stop", "matched": tok}
            if tok in p.stop_token_ids:
                return {"type": "stop", "matched": tok}
            if p.stop:
                tail = self.tokenizer.decode(ids[-window:], skip_special_tokens=p.skip_special_tokens)
                for s in p.stop:
                    if s and s in tail:
                        return {"type": "stop", "matched": s}
        if len(ids) >= budget:
            return {"type": "length", "length": p.max_new_tokens if budget == p.max_new_tokens else budget}
        return None

    def _outputs(
        self,
        reqs: list[GenerationRequest],
        out_ids: list[list[int]],
        out_lps: list[list[float]],
        finish: list[dict[str, Any] | None],
        input_lps: list[list[float | None]],
    ) -> list[GenerationOutput]:
        results = []
        for i, r in enumerate(reqs):
            p = r.params
            reason = finish[i] or {"type": "length", "length": p.max_new_tokens}
            ids = out_ids[i]
            matched = reason.get("matched")
            text_ids = ids[:-1] if isinstance(matched, int) and not p.no_stop_trim and ids and ids[-1] == matched else ids
            text = str(self.tokenizer.decode(text_ids, skip_special_tokens=p.skip_special_tokens))
            if isinstance(matched, str) and not p.no_stop_trim and matched in text:
                text = text[: text.index(matched)]
            results.append(GenerationOutput(ids, out_lps[i], reason, text, input_lps[i]))
        return results

    # ------------------------------------------------------------------ weights

    def state(self) -> dict[str, torch.Tensor]:
        """HF-named tensors (tied aliases included), the names weight sync and checkpoints use."""
        return dict(self.model.state_dict())

    @torch.no_grad()
    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy tensors into the model by HF name, casting to the engine's dtype; returns the count."""
        state = self.state()
        count = 0
        for name, tensor in named:
            if name not in state:
                raise KeyError(f"weight {name!r} is not a parameter of the engine's model ({len(state)} names)")
            target = state[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} != engine's {tuple(target.shape)}")
            target.copy_(tensor.to(device=target.device))
            count += 1
        return count

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[Any]:
        """SGLang's /get_weights_by_name value: the tensor as float32 lists, first ``truncate_size`` rows."""
        state = self.state()
        if name not in state:
            raise KeyError(f"no weight named {name!r}")
        values: list[Any] = state[name].detach().to("cpu", torch.float32).numpy().tolist()
        return values[:truncate_size]

    def checksums(self) -> dict[str, str]:
        return {name: tensor_checksum(t) for name, t in self.state().items()}

    # ------------------------------------------------------------------ memory

    def release(self, tags: list[str] | None) -> None:
        """Release memory (SGLang tags ``weights``, ``kv_cache``).

        The KV cache lives only while a batch runs, so ``kv_cache`` just marks the
        engine; ``weights`` moves the parameters to host memory when the engine is
        on an accelerator (on a CPU there is nothing to free and the weights stay).
        Generation is refused until resumed.
        """
        tags = list(tags or ["weights", "kv_cache"])
        if "weights" in tags and "weights" not in self.released and self.device.type != "cpu":
            self.model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.released.update(tags)

    def resume(self, tags: list[str] | None) -> None:
        tags = list(tags or ["weights", "kv_cache"])
        if "weights" in tags and "weights" in self.released and self.device.type != "cpu":
            self.model.to(self.device)
        self.released.difference_update(tags)
