"""Writing an actor's weights as an HF model directory (``[ckpt] save_hf``, evaluation, hand-off).

Backend-neutral: it consumes :meth:`miles.train.actor.Actor.named_hf_weights`,
so FSDP and Megatron checkpoints load the same way with
``AutoModelForCausalLM.from_pretrained`` and serve in SGLang unchanged.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable

import torch
import torch.distributed as dist

CONFIG_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


def save_hf_checkpoint(
    weights: Iterable[tuple[str, torch.Tensor]],
    out_dir: str,
    model_dir: str,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Write ``model.safetensors`` plus the source directory's config and tokenizer files.

    Collective: every trainer rank must call it (the weight export gathers);
    rank 0 of ``group`` writes. The safetensors file is written under a
    temporary name and renamed, so a reader never sees half a file; the
    caller makes the whole directory atomic if it needs that.
    """
    from safetensors.torch import save_file

    is_writer = not dist.is_initialized() or dist.get_rank(group) == 0
    tensors: dict[str, torch.Tensor] = {}
    for name, t in weights:  # every rank iterates to the end: the export is collective
        if is_writer:
            tensors[name] = t.detach().to("cpu").contiguous()
    if not is_writer:
        return
    os.makedirs(out_dir, exist_ok=True)
    for fname in sorted(os.listdir(model_dir)):
        src = os.path.join(model_dir, fname)
        if os.path.isfile(src) and fname.endswith(CONFIG_SUFFIXES) and "safetensors" not in fname:
            shutil.copy2(src, os.path.join(out_dir, fname))
    tmp = os.path.join(out_dir, ".model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
