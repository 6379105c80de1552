"""A tiny Qwen2 checkpoint and a fixed rollout for the actor tests (no model hub)."""

from __future__ import annotations

from typing import Any

import torch

from miles.algo.advantages import AdvantageInputs, compute_advantages
from miles.sample import Sample
from miles.spec.tables import GrpoConfig, ModelConfig, OptimizerConfig, PerfConfig, Spec, TrainConfig
from miles.train.batch import RolloutBatch

VOCAB = 96
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2
EPS32 = torch.finfo(torch.float32).eps


def reorder_bound(row_len: int) -> float:
    """Relative change of the tiny model's log-probs and entropies when only the order of the float32 sums in its
    forward changes (another layout, other kernel blocking), for rows of at most ``row_len`` tokens.

    A float32 sum of ``n`` terms moves by at most ``n * eps32`` of its terms' magnitudes when reordered (the
    recursive-summation bound), and first-order errors add along the forward's chain of sums: per layer the
    RMSNorm (hidden), the q/k/v projections (hidden), the attention scores (head_dim), the softmax's denominator
    and the weighted sum of values (up to ``row_len`` keys each), the output projection (hidden), a second
    RMSNorm, the MLP's gate/up (hidden) and down (intermediate) projections; then the final RMSNorm, the LM head
    (hidden) and the log-softmax over the vocabulary.
    """
    head_dim = HIDDEN // HEADS
    per_layer = HIDDEN + HIDDEN + head_dim + 2 * row_len + HIDDEN + HIDDEN + HIDDEN + INTERMEDIATE
    return (LAYERS * per_layer + HIDDEN + HIDDEN + VOCAB) * EPS32


def write_tiny_qwen2(path: str, seed: int = 0) -> None:
    """Save a randomly initialised 2-layer Qwen2 (hidden 32, vocab 96, tied embeddings) as an HF directory."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(cfg).save_pretrained(path)


def tiny_spec(**train: object) -> Spec:
    """A spec for 8 samples: 2 optimizer steps of 4 samples, lr high enough to move a tiny model."""
    t = {"global_batch_size": 4, "num_steps_per_rollout": 2, "micro_batch_size": 1}
    t.update(train)
    return Spec(
        model=ModelConfig(dtype="float32"),
        train=TrainConfig(**t),  # type: ignore[arg-type]
        perf=PerfConfig(backend="fsdp"),
        optimizer=OptimizerConfig(lr=1e-2, lr_warmup_iters=2, lr_decay_style="cosine", clip_grad=1.0),
        grpo=GrpoConfig(use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="low_var_kl", entropy_coef=0.01),
    )


def fixed_samples(seed: int = 1, n: int = 8, group: int = 4) -> list[Sample]:
    """``n`` samples of varied prompt/response lengths with 0/1 rewards, deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = 3 + int(torch.randint(0, 4, (1,), generator=g))
        r = 2 + int(torch.randint(0, 6, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (p + r,), generator=g).tolist()
        out.append(
            Sample(
                group_index=i // group,
                prompt_index=i // group,
                prompt="",
                prompt_text="",
                prompt_ids=ids[:p],
                response_ids=ids[p:],
                response_logprobs=[-1.0] * r,
                reward=float((i * 7 + seed) % 3 == 0),
            )
        )
    return out


def rollout_batch(seed: int = 1) -> RolloutBatch:
    batch = RolloutBatch.from_samples(fixed_samples(seed))
    batch.advantages = compute_advantages(
        GrpoConfig(), AdvantageInputs(rewards=batch.rewards, group_index=batch.group_index, loss_masks=batch.loss_masks)
    )
    return batch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def assert_layouts_agree(padded: dict[str, Any], packed: dict[str, Any]) -> None:
    """One rollout trained padded (``qkv_format = "bshd"``) and packed (``"thd"``), as the actor workers record it:
    the same arithmetic on every token but for the order of float32 sums, so equal within what reordering allows.

    ``tokens`` is the rollout's token count, the longest row either layout forms (all of it packed in one row):
    log-probs and entropies move by at most :func:`reorder_bound` of it. A weight's gradient goes back through
    the same chain and sums over the step's ``tokens`` positions, so it moves by at most twice the forward's
    bound plus ``tokens * eps32``. The step's metrics are means over ``train_tokens`` tokens of per-token terms
    no larger than the largest |log-prob| times the largest |advantage| (a KL term is a function of a difference
    of two log-probs, an entropy at most log V, a policy-gradient term an advantage times a ratio near 1), each
    moving by twice the forward's bound, and summed in another order.
    """
    assert (padded["packed"], packed["packed"]) == (False, True)
    assert padded["tokens"] == packed["tokens"]
    forward = reorder_bound(padded["tokens"])
    assert _rel(torch.cat(packed["old_logprobs"]), torch.cat(padded["old_logprobs"])) <= forward
    if "lp" in padded:
        assert padded["lp"].numel() == packed["lp"].numel() > 0
        assert _rel(packed["lp"], padded["lp"]) <= forward
        assert _rel(packed["ent"], padded["ent"]) <= forward
    (a,), (b,) = packed["metrics"], padded["metrics"]
    assert a["train_tokens"] == b["train_tokens"]
    scale = max(float(torch.cat(padded["old_logprobs"]).abs().max()), 1.0)
    scale *= max(float(torch.cat(padded["advantages"]).abs().max()), 1.0)
    means = (2 * forward + a["train_tokens"] * EPS32) * scale
    for key in ("loss", "pg_loss", "entropy", "kl_loss"):
        assert abs(a[key] - b[key]) <= means, (key, a[key], b[key], means)
    grads = 2 * forward + padded["tokens"] * EPS32
    assert abs(a["grad_norm"] - b["grad_norm"]) <= grads * abs(b["grad_norm"]), (a["grad_norm"], b["grad_norm"])
    assert sorted(packed["grads"]) == sorted(padded["grads"])
    for name, g in padded["grads"].items():
        assert _rel(packed["grads"][name], g) <= grads, name
