"""A tiny local tokenizer with a chat template (no model hub): a word-level vocabulary built on the fly."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = ["[UNK]", "<s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "think", "be", "brief"]
WORDS += ["what", "is", "plus", "hello", "world", "a", "long", "prompt", "with", "many", "words"]
WORDS += [str(i) for i in range(20)]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% if enable_thinking %}think {% endif %}{% endif %}"
)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast
