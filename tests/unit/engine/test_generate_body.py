"""SGLang's /generate body read into engine requests and written back, without a model or a server."""

from __future__ import annotations

import pytest

from miles.engine.core import GenerationOutput, GenerationRequest
from miles.engine.generate_body import UNSUPPORTED_GENERATE_KEYS, aborted_in_queue, answer_body, read_generate


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_single_prompt_is_not_batched() -> None:
    reqs, batched, rids, want = read_generate({"input_ids": [1, 2, 3], "rid": "a"}, encode)
    assert [r.input_ids for r in reqs] == [[1, 2, 3]] and not batched and rids == ["a"] and want == [False]


def test_n_expands_item_major_with_consecutive_seeds() -> None:
    body = {
        "text": ["ab", "c"],
        "rid": ["x", "y"],
        "return_logprob": [True, False],
        "logprob_start_len": [0, 0],
        "sampling_params": [{"n": 2, "sampling_seed": 7}, None],
    }
    reqs, batched, rids, want = read_generate(body, encode)
    assert batched
    assert [r.input_ids for r in reqs] == [[97, 98], [97, 98], [99]]
    assert rids == ["x_0", "x_1", "y"] and want == [True, True, False]
    assert [r.params.sampling_seed for r in reqs] == [7, 8, None] and all(r.params.n == 1 for r in reqs)
    assert [r.logprob_start_len for r in reqs] == [0, 0, -1]  # no logprobs asked: none computed


@pytest.mark.parametrize("key", UNSUPPORTED_GENERATE_KEYS)
def test_unsupported_fields_are_refused_by_name(key: str) -> None:
    with pytest.raises(ValueError, match=key):
        read_generate({"input_ids": [1], key: "x"}, encode)


def test_text_or_input_ids() -> None:
    with pytest.raises(ValueError, match="Either text or input_ids"):
        read_generate({"text": "a", "input_ids": [1]}, encode)


def test_answer_carries_logprobs_as_sglang_triples() -> None:
    req = GenerationRequest([5, 6, 7], logprob_start_len=1)
    out = GenerationOutput([8], [-0.5], {"type": "length", "length": 1}, "h", [None, -1.0])
    body = answer_body(out, req, "r", True, 0.25, "v3")
    meta = body["meta_info"]
    assert body["text"] == "h" and body["output_ids"] == [8]
    assert meta["id"] == "r" and meta["weight_version"] == "v3" and meta["prompt_tokens"] == 3
    assert meta["input_token_logprobs"] == [[None, 6, None], [-1.0, 7, None]]
    assert meta["output_token_logprobs"] == [[-0.5, 8, None]] and meta["completion_tokens"] == 1


def test_queued_abort() -> None:
    out = aborted_in_queue()
    assert out.output_ids == [] and out.finish_reason["type"] == "abort"
    assert out.finish_reason["message"] == "Abort in waiting queue"
