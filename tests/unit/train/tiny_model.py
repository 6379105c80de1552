"""A tiny Qwen2 checkpoint and a fixed rollout for the actor tests (no model hub)."""

from __future__ import annotations

import torch

from miles.algo.advantages import AdvantageInputs, compute_advantages
from miles.sample import Sample
from miles.spec.tables import GrpoConfig, ModelConfig, OptimizerConfig, PerfConfig, Spec, TrainConfig
from miles.train.batch import RolloutBatch

VOCAB = 96


def write_tiny_qwen2(path: str, seed: int = 0) -> None:
    """Save a randomly initialised 2-layer Qwen2 (hidden 32, vocab 96, tied embeddings) as an HF directory."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
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
