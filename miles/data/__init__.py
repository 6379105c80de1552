"""Prompt data: JSONL/parquet records with Miles' keys, rendered, tokenized and sampled by epoch.

Entry points for the loop::

    dataset = PromptDataset.from_spec(spec.rollout, tokenizer)
    prompts = dataset.sample(rollout_batch_size)
    samples = expand_groups(prompts, n_samples_per_prompt)
    ckpt["dataset"] = dataset.state_dict()   # ... dataset.load_state_dict(...) on resume
"""

from miles.data.dataset import DataKeys, Prompt, PromptDataset, epoch_order, render_record
from miles.data.groups import expand_groups
from miles.data.records import Record, read_records

__all__ = [
    "DataKeys",
    "Prompt",
    "PromptDataset",
    "Record",
    "epoch_order",
    "expand_groups",
    "read_records",
    "render_record",
]
