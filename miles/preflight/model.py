"""Pre-flight of ``[model] hf_checkpoint``: an HF directory the run can load (config.json, weights, tokenizer);
and of ``[ckpt] ref_load``: not a Megatron checkpoint (:mod:`miles.ckpt.reference`).

The engines and the trainer both load this directory; when they cannot, the
run fails after its processes (or its Slurm job) have started, often inside
the tokenizer, which reads config.json first. The architecture rules live in
:mod:`miles.model.architectures`; this module only reads the directory.
A built-in model (``[model] builtin``) is written by miles itself and needs no check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from miles.ckpt.reference import refuse_megatron_reference
from miles.model.architectures import support
from miles.preflight.paths import look
from miles.preflight.report import Report
from miles.spec.tables import Spec

KEY = ("model", "hf_checkpoint")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
"""Files that carry a tokenizer's vocabulary (fast tokenizer, SentencePiece, BPE, WordPiece)."""

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")


def _read_json(path: Path) -> tuple[Any, str]:
    """The parsed JSON of ``path``, or (None, why not) naming ``file:line``."""
    try:
        return json.loads(path.read_text(encoding="utf-8")), ""
    except json.JSONDecodeError as e:
        return None, f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{path}: cannot be read ({e})"


def check_model(spec: Spec, report: Report, local_only: bool) -> None:
    """Check the model directory of ``spec`` against its ``[perf] backend`` and ``[rollout] engine``."""
    _check_reference(spec, report, local_only)
    path = spec.model.hf_checkpoint
    if spec.model.builtin or not path:
        return
    seen = look(path, local_only)
    if seen.kind == "elsewhere":
        report.note(f"model.hf_checkpoint: {seen.why}")
        return
    fix = "set [model] hf_checkpoint to an HF model directory (config.json, weights, tokenizer files)"
    if seen.kind == "missing":
        report.problem(KEY, f"{path}: {seen.why}; {fix}")
        return
    root = Path(path)
    if not root.is_dir():
        report.problem(KEY, f"{path} is a file, not a directory; {fix}")
        return
    config_path = root / "config.json"
    if not config_path.is_file():
        report.problem(
            KEY,
            f"{path} has no config.json, so no engine or trainer can load it; {fix} "
            "(a directory written by save_pretrained has one)",
        )
        return
    config, why = _read_json(config_path)
    if why:
        report.problem(KEY, f"{why}; restore the file (e.g. from the model's original download)")
        return
    if not isinstance(config, dict):
        report.problem(KEY, f"{config_path}: expected a JSON object, got {type(config).__name__}; restore the file")
        return
    problems, notes = support(config, spec.perf.backend, spec.rollout.engine, spec.model.trust_remote_code)
    for message in problems:
        report.problem(KEY, f"{config_path}: {message}")
    for message in notes:
        report.note(f"model.hf_checkpoint: {message}")
    if not any(any(root.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        report.problem(KEY, f"{path} holds no weights (*.safetensors or pytorch_model*.bin); {fix}")
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        report.problem(
            KEY,
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer "
            "files of the base model into it (tokenizer.save_pretrained does this)",
        )
    tokenizer_config = root / "tokenizer_config.json"
    if tokenizer_config.is_file():
        _, why = _read_json(tokenizer_config)
        if why:
            report.problem(KEY, f"{why}; restore the file")


def _check_reference(spec: Spec, report: Report, local_only: bool) -> None:
    """``[ckpt] ref_load`` is read as an HF directory: a Megatron checkpoint there is refused with the fix."""
    path = spec.ckpt.ref_load
    if not path:
        return
    seen = look(path, local_only)
    if seen.kind == "elsewhere":
        report.note(f"ckpt.ref_load: {seen.why}")
        return
    if seen.kind == "missing":
        report.problem(
            ("ckpt", "ref_load"),
            f"{path}: {seen.why}; set ref_load to an HF model directory, or leave it empty to use the initial weights",
        )
        return
    why = refuse_megatron_reference(path)
    if why:
        report.problem(("ckpt", "ref_load"), why)
