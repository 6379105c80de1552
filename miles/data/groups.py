"""Expanding a batch of prompts into GRPO groups of samples.

GRPO compares the ``n`` responses to one prompt, so each prompt becomes ``n``
:class:`~miles.sample.Sample` objects that share a ``group_index``; the engine
then fills their response fields in place and the reward their ``reward``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from miles.data.dataset import Prompt
from miles.sample import Sample


def expand_groups(prompts: Sequence[Prompt], n_samples_per_prompt: int | None) -> list[Sample]:
    """``len(prompts) * n`` samples, grouped contiguously: samples ``[g*n, (g+1)*n)`` belong to prompt ``g``.

    ``None`` (the spec's "not set") means Miles' default of 1. Each sample gets
    its own copy of the label and metadata, so a reward function that mutates
    one sample's metadata cannot leak into its siblings.
    """
    if n_samples_per_prompt is None:
        n_samples_per_prompt = 1
    if n_samples_per_prompt <= 0:
        raise ValueError(f"n_samples_per_prompt must be positive, got {n_samples_per_prompt}")
    samples: list[Sample] = []
    for group_index, p in enumerate(prompts):
        for _ in range(n_samples_per_prompt):
            samples.append(
                Sample(
                    group_index=group_index,
                    prompt_index=p.index,
                    prompt=p.prompt,
                    prompt_text=p.prompt_text,
                    prompt_ids=list(p.prompt_ids),
                    label=copy.deepcopy(p.label),
                    metadata=copy.deepcopy(p.metadata),
                )
            )
    return samples
