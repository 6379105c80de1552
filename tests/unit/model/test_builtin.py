"""Built-in models are real HF directories that transformers loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from miles.errors import UserError
from miles.model.builtin import materialize, vocab_size


def test_tiny_arith_is_a_loadable_hf_directory(tmp_path: Path) -> None:
    path = materialize("tiny-arith", tmp_path / "m", seed=3)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tok("07+45=")["input_ids"]
    assert len(ids) == 6 and tok.decode(ids) == "07+45="
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0
    assert model.config.vocab_size == vocab_size("tiny-arith") == 20
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, 6, 20)


def test_same_seed_same_weights_and_existing_dir_is_kept(tmp_path: Path) -> None:
    a = AutoModelForCausalLM.from_pretrained(materialize("tiny-arith", tmp_path / "a", seed=7))
    b = AutoModelForCausalLM.from_pretrained(materialize("tiny-arith", tmp_path / "b", seed=7))
    c = AutoModelForCausalLM.from_pretrained(materialize("tiny-arith", tmp_path / "c", seed=8))
    for (n, pa), pb, _pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), n
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values(), strict=True))
    before = (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns
    materialize("tiny-arith", tmp_path / "a", seed=99)
    assert (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns == before


def test_unknown_builtin_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"tiny-arith"):
        materialize("tiny-nope", tmp_path)
