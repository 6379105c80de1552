"""Which HF model architectures each trainer backend and rollout engine loads, decided without importing torch.

A model directory is loaded three ways in a run: by the trainer backend
(Megatron maps a fixed set of families onto its own modules; FSDP loads
whatever ``AutoModelForCausalLM`` loads), and by the rollout engine (the
embedded engine is ``AutoModelForCausalLM`` as well; SGLang has its own model
registry). ``miles validate`` answers "will this model load?" on a login node,
where importing torch is slow or impossible, so everything here reads files:

* :data:`MEGATRON_FAMILIES` is the list the Megatron mapping
  (:mod:`miles.train.megatron.config`) takes as its own;
* the ``model_type`` values ``AutoModelForCausalLM`` knows are read from the
  installed transformers' source (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), since
  importing that module imports torch;
* SGLang's architectures are the ``EntryClass`` names of its model files, when
  SGLang is installed on this machine (it usually is not on a login node).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MEGATRON_FAMILIES: tuple[str, ...] = ("qwen2", "qwen3", "llama", "qwen3_moe")
"""HF ``model_type`` values the Megatron backend maps (its weight mapping and model config are built for these)."""

MEGATRON_ARCHITECTURES: dict[str, str] = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
"""The HF class of each mapped family, for messages."""


def megatron_families_text() -> str:
    """``qwen2 (Qwen2ForCausalLM), ...`` for messages."""
    return ", ".join(f"{f} ({MEGATRON_ARCHITECTURES[f]})" for f in MEGATRON_FAMILIES)


_CAUSAL_LM_TABLE = "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"
_ENTRY_CLASS = re.compile(r"^EntryClass\s*=\s*(\[[^\]]*\]|[A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)


def _package_dir(name: str) -> Path | None:
    """Where package ``name`` is installed, found without importing it (None when it is not installed)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=1)
def causal_lm_types() -> Mapping[str, str] | None:
    """``model_type`` -> class that ``AutoModelForCausalLM`` builds, in the installed transformers.

    None when transformers is not installed or its source does not hold the table
    in this form (the caller then skips the check with a note).
    """
    root = _package_dir("transformers")
    source = root / "models" / "auto" / "modeling_auto.py" if root else None
    if source is None or not source.is_file():
        return None
    tree = ast.parse(source.read_text(encoding="utf-8"))
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == _CAUSAL_LM_TABLE
            and isinstance(node.value, ast.Call)
            and node.value.args
        ):
            try:
                return dict(ast.literal_eval(node.value.args[0]))
            except (ValueError, TypeError):
                return None
    return None


@functools.lru_cache(maxsize=1)
def sglang_architectures() -> frozenset[str] | None:
    """The ``architectures`` names SGLang's model registry serves, or None when SGLang is not installed here."""
    root = _package_dir("sglang")
    models = root / "srt" / "models" if root else None
    if models is None or not models.is_dir():
        return None
    names: set[str] = set()
    for path in models.glob("*.py"):
        for m in _ENTRY_CLASS.finditer(path.read_text(encoding="utf-8", errors="replace")):
            names.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", m.group(1)))
    return frozenset(names)


def support(
    config: Mapping[str, Any], backend: str, engine: str, trust_remote_code: bool
) -> tuple[list[str], list[str]]:
    """Why the model of ``config`` (a parsed ``config.json``) cannot run with ``backend`` and ``engine``.

    Returns (problems, notes): each problem names what does not fit and the spec
    key to change; a note says which part was not checked on this machine and why.
    """
    problems: list[str] = []
    notes: list[str] = []
    model_type = config.get("model_type")
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    what = f"model_type {model_type!r}" + (f" ({', '.join(archs)})" if archs else "")
    if not isinstance(model_type, str) or not model_type:
        problems.append(
            "config.json has no model_type; it is not an HF transformers model directory "
            "(re-export it with save_pretrained)"
        )
        return problems, notes
    if backend == "megatron" and model_type not in MEGATRON_FAMILIES:
        problems.append(
            f"{what} has no Megatron mapping (supported: {megatron_families_text()}); "
            'set [perf] backend = "fsdp", which trains any HF causal LM, or choose a supported model'
        )
    users = [
        u
        for u, needed in (
            ('[perf] backend = "fsdp"', backend == "fsdp"),
            ('[rollout] engine = "embedded"', engine == "embedded"),
        )
        if needed
    ]
    if users:
        known = causal_lm_types()
        remote = trust_remote_code and "AutoModelForCausalLM" in (config.get("auto_map") or {})
        if known is None:
            notes.append(
                "transformers' model table could not be read here; the causal-LM check of "
                f"{what} runs when the model loads"
            )
        elif model_type not in known and not remote:
            hint = (
                "; the directory ships its own modelling code (auto_map): set [model] trust_remote_code = true"
                if "AutoModelForCausalLM" in (config.get("auto_map") or {})
                else ""
            )
            problems.append(
                f"{what} is not a causal LM that the installed transformers loads "
                f"(AutoModelForCausalLM), needed by {' and '.join(users)}; point [model] hf_checkpoint "
                f"at a causal LM such as a Qwen2, Qwen3 or Llama directory{hint}"
            )
    if engine == "sglang":
        served = sglang_architectures()
        if served is None:
            notes.append(f"SGLang is not installed here; whether it serves {what} is checked when its engines start")
        elif not any(a in served for a in archs):
            problems.append(
                f"{what}: SGLang serves none of the architectures {archs or '(none listed)'}; "
                'set [rollout] engine = "embedded", or choose a model SGLang supports'
            )
    return problems, notes
