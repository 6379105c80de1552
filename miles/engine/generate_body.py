"""SGLang's ``/generate`` body, both ways, for the embedded engine's server.

The trainer's rollout client speaks SGLang 0.5.20's ``GenerateReqInput``
(``sglang/srt/managers/io_struct.py``) to whichever engine serves it, so the
embedded engine reads that body into its own :class:`~miles.engine.core.GenerationRequest`
list and writes each :class:`~miles.engine.core.GenerationOutput` back as the
``{text, output_ids, meta_info}`` answer SGLang's tokenizer manager builds.
Kept apart from :mod:`miles.engine.server` (the routes, queue and batcher):
this is the protocol's translation alone, with no server state but the weight
version an answer reports.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from typing import Any

from miles.engine.core import GenerationOutput, GenerationRequest
from miles.engine.sampling import SamplingParams

UNSUPPORTED_GENERATE_KEYS = (
    "input_embeds",
    "image_data",
    "video_data",
    "audio_data",
    "lora_path",
    "custom_logit_processor",
    "session_params",
    "token_ids_logprob",
    "return_hidden_states",
    "return_routed_experts",
)
"""GenerateReqInput fields the embedded engine refuses when set (SGLang accepts them)."""


def read_generate(
    body: dict[str, Any], encode: Callable[[str], list[int]]
) -> tuple[list[GenerationRequest], bool, list[str], list[bool]]:
    """GenerateReqInput -> engine requests, expanded over batch items and ``n`` (item-major, as SGLang).

    Returns the requests, whether the answer is a list, each request's rid and whether it asked for logprobs;
    ``encode`` tokenizes a ``text`` prompt. Raises ValueError (or SamplingError) naming a field it cannot serve.
    """
    for key in UNSUPPORTED_GENERATE_KEYS:
        if body.get(key) not in (None, False, [], ""):
            raise ValueError(f"{key} is not supported by the embedded engine")
    if body.get("stream"):
        raise ValueError("stream is not supported by the embedded engine; send stream=false")
    if body.get("top_logprobs_num") not in (None, 0) and body.get("return_logprob"):
        raise ValueError("top_logprobs_num > 0 is not supported by the embedded engine")
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise ValueError("Either text or input_ids should be provided.")
    if input_ids is not None:
        batched = bool(input_ids) and isinstance(input_ids[0], list)
        prompts = [list(map(int, x)) for x in input_ids] if batched else [list(map(int, input_ids))]
    else:
        batched = isinstance(text, list)
        texts: list[Any] = text if isinstance(text, list) else [text]
        prompts = [encode(str(t)) for t in texts]
    count = len(prompts)

    def per_item(key: str, default: Any) -> list[Any]:
        value = body.get(key)
        if value is None:
            return [default] * count
        if isinstance(value, list) and key != "sampling_params":
            if len(value) != count:
                raise ValueError(f"{key} has {len(value)} entries for {count} prompts")
            return value
        if isinstance(value, list):
            if len(value) != count:
                raise ValueError(f"sampling_params has {len(value)} entries for {count} prompts")
            return value
        return [value] * count

    sampling = [SamplingParams.from_json(s) for s in per_item("sampling_params", None)]
    return_lp = [bool(x) for x in per_item("return_logprob", False)]
    starts = [int(x) for x in per_item("logprob_start_len", -1)]
    rid = body.get("rid")
    base_rids = (
        rid
        if isinstance(rid, list)
        else [(f"{rid}_{i}" if batched and rid else rid) or uuid.uuid4().hex for i in range(count)]
    )
    reqs: list[GenerationRequest] = []
    rids: list[str] = []
    want: list[bool] = []
    for i in range(count):
        p = sampling[i]
        for j in range(p.n):
            seed = p.sampling_seed + j if p.sampling_seed is not None and p.n > 1 else p.sampling_seed
            params = dataclasses.replace(p, sampling_seed=seed, n=1) if p.n > 1 else p
            reqs.append(GenerationRequest(prompts[i], params, starts[i] if return_lp[i] else -1))
            rids.append(str(base_rids[i]) if p.n == 1 else f"{base_rids[i]}_{j}")
            want.append(return_lp[i])
    return reqs, batched or len(reqs) > 1, rids, want


def answer_body(
    out: GenerationOutput, req: GenerationRequest, rid: str, want_lp: bool, latency: float, weight_version: str
) -> dict[str, Any]:
    """One request's answer: SGLang's ``{text, output_ids, meta_info}``, logprobs as ``[logprob, token, None]``."""
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": out.finish_reason,
        "prompt_tokens": len(req.input_ids),
        "weight_version": weight_version,
        "num_retractions": 0,
    }
    if want_lp:
        meta["input_token_logprobs"] = [
            [lp, tok, None]
            for lp, tok in zip(out.input_logprobs, req.input_ids[max(req.logprob_start_len, 0) :], strict=False)
        ]
        meta["output_token_logprobs"] = [
            [lp, tok, None] for lp, tok in zip(out.output_logprobs, out.output_ids, strict=True)
        ]
        meta["output_token_logprobs_length"] = len(out.output_ids)
    meta.update(
        {
            "reasoning_tokens": 0,
            "completion_tokens": len(out.output_ids),
            "cached_tokens": 0,
            "e2e_latency": latency,
        }
    )
    return {"text": out.text, "output_ids": out.output_ids, "meta_info": meta}


def aborted_in_queue() -> GenerationOutput:
    """The output of a request aborted before it ran (SGLang's finish reason for its waiting queue)."""
    return GenerationOutput(
        [],
        [],
        {"type": "abort", "message": "Abort in waiting queue", "status_code": None, "err_type": None},
        "",
    )
