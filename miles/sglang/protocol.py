"""SGLang's HTTP protocol as miles speaks it: every endpoint and every request body, built in one place.

Why one place: miles drives SGLang servers (and the embedded engine, which
serves the same protocol) from several components: the rollout client
(``/generate``), the weight sync (``/init_weights_update_group``,
``/update_weights_from_distributed``, ``/update_weights_from_tensor``,
``/pause_generation`` ...), the loop (``/release_memory_occupation`` around
training when colocated). If each built its own JSON, a field renamed in an
SGLang release would be found by one caller and missed by the others. Here each
body has one typed builder, and
``tests/unit/sglang/test_conformance.py`` checks every builder against
the pinned SGLang release's own request classes and route table, read from its
wheel: path, method, field names and types, required fields. Bumping
``miles.sglang.flags.SGLANG_PIN`` re-runs that check.

Builders return plain JSON-ready dicts, leaving out fields miles does not set
(SGLang applies its defaults), so a body never depends on defaults this module
would have to copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Endpoint:
    """One SGLang route miles calls: path, the method miles uses, and SGLang's request class (None: no body)."""

    path: str
    method: Literal["GET", "POST"]
    body_class: str | None


GENERATE = Endpoint("/generate", "POST", "GenerateReqInput")
HEALTH_GENERATE = Endpoint("/health_generate", "GET", None)
"""Healthy only once the server generated one token: what the launcher waits for."""
HEALTH = Endpoint("/health", "GET", None)
FLUSH_CACHE = Endpoint("/flush_cache", "POST", None)
INIT_WEIGHTS_UPDATE_GROUP = Endpoint("/init_weights_update_group", "POST", "InitWeightsUpdateGroupReqInput")
DESTROY_WEIGHTS_UPDATE_GROUP = Endpoint("/destroy_weights_update_group", "POST", "DestroyWeightsUpdateGroupReqInput")
UPDATE_WEIGHTS_FROM_DISTRIBUTED = Endpoint(
    "/update_weights_from_distributed", "POST", "UpdateWeightsFromDistributedReqInput"
)
UPDATE_WEIGHTS_FROM_TENSOR = Endpoint("/update_weights_from_tensor", "POST", "UpdateWeightsFromTensorReqInput")
RELEASE_MEMORY_OCCUPATION = Endpoint("/release_memory_occupation", "POST", "ReleaseMemoryOccupationReqInput")
RESUME_MEMORY_OCCUPATION = Endpoint("/resume_memory_occupation", "POST", "ResumeMemoryOccupationReqInput")
PAUSE_GENERATION = Endpoint("/pause_generation", "POST", "PauseGenerationReqInput")
CONTINUE_GENERATION = Endpoint("/continue_generation", "POST", "ContinueGenerationReqInput")
UPDATE_WEIGHT_VERSION = Endpoint("/update_weight_version", "POST", "UpdateWeightVersionReqInput")
GET_WEIGHT_VERSION = Endpoint("/get_weight_version", "GET", None)
ABORT_REQUEST = Endpoint("/abort_request", "POST", "AbortReq")
WEIGHTS_CHECKER = Endpoint("/weights_checker", "POST", "Optional[CheckWeightsReqInput]")

ENDPOINTS: tuple[Endpoint, ...] = (
    GENERATE,
    HEALTH_GENERATE,
    HEALTH,
    FLUSH_CACHE,
    INIT_WEIGHTS_UPDATE_GROUP,
    DESTROY_WEIGHTS_UPDATE_GROUP,
    UPDATE_WEIGHTS_FROM_DISTRIBUTED,
    UPDATE_WEIGHTS_FROM_TENSOR,
    RELEASE_MEMORY_OCCUPATION,
    RESUME_MEMORY_OCCUPATION,
    PAUSE_GENERATION,
    CONTINUE_GENERATION,
    UPDATE_WEIGHT_VERSION,
    GET_WEIGHT_VERSION,
    ABORT_REQUEST,
    WEIGHTS_CHECKER,
)
"""Every route miles calls; the conformance test checks each against SGLang's route table."""

WEIGHT_UPDATE_GROUP = "weight_update_group"
"""SGLang's default group name; miles names its group explicitly anyway."""

FLATTENED_BUCKET = "flattened_bucket"
"""``load_format`` of /update_weights_from_distributed meaning: one broadcast of the uint8 concatenation of
every tensor's bytes, in the order of ``names`` (SGLang's ``FlattenedTensorBucket``)."""

PauseMode = Literal["abort", "retract", "in_place"]


def sampling_params(
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    sampling_seed: int | None = None,
    n: int = 1,
    skip_special_tokens: bool | None = None,
    no_stop_trim: bool | None = None,
    ignore_eos: bool | None = None,
) -> dict[str, Any]:
    """SGLang's ``sampling_params`` object (keys of ``SamplingParams``)."""
    out: dict[str, Any] = {
        "max_new_tokens": int(max_new_tokens),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "top_k": int(top_k),
    }
    if stop:
        out["stop"] = list(stop)
    if stop_token_ids:
        out["stop_token_ids"] = [int(t) for t in stop_token_ids]
    if sampling_seed is not None:
        out["sampling_seed"] = int(sampling_seed)
    if n != 1:
        out["n"] = int(n)
    for key, value in (
        ("skip_special_tokens", skip_special_tokens),
        ("no_stop_trim", no_stop_trim),
        ("ignore_eos", ignore_eos),
    ):
        if value is not None:
            out[key] = bool(value)
    return out


def generate_body(
    *,
    input_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
    text: str | Sequence[str] | None = None,
    sampling: dict[str, Any] | Sequence[dict[str, Any]],
    return_logprob: bool = True,
    logprob_start_len: int | None = None,
    rid: str | None = None,
    stream: bool = False,
) -> dict[str, Any]:
    """A /generate request: one prompt (or a batch) by token ids or text, with per-token logprobs by default.

    ``logprob_start_len = -1`` asks for no prompt logprobs (only the response's), which
    is what a rollout needs; SGLang's own default computes them for the whole prompt.
    """
    if (input_ids is None) == (text is None):
        raise ValueError("give exactly one of input_ids or text")
    body: dict[str, Any] = {}
    if input_ids is not None:
        rows: list[Any] = list(input_ids)
        if rows and isinstance(rows[0], Sequence):
            body["input_ids"] = [[int(t) for t in row] for row in rows]
        else:
            body["input_ids"] = [int(t) for t in rows]
    else:
        body["text"] = text if isinstance(text, str) else list(text or [])
    body["sampling_params"] = sampling if isinstance(sampling, dict) else [dict(s) for s in sampling]
    body["return_logprob"] = bool(return_logprob)
    if return_logprob:
        body["logprob_start_len"] = -1 if logprob_start_len is None else int(logprob_start_len)
    if rid is not None:
        body["rid"] = rid
    if stream:
        body["stream"] = True
    return body


def init_weights_update_group_body(
    *,
    master_address: str,
    master_port: int,
    rank_offset: int,
    world_size: int,
    group_name: str = WEIGHT_UPDATE_GROUP,
    backend: Literal["nccl", "gloo"] = "nccl",
) -> dict[str, Any]:
    """Join an engine to the weight-update group: its TP ranks take ``rank_offset .. rank_offset+tp-1``."""
    return {
        "master_address": master_address,
        "master_port": int(master_port),
        "rank_offset": int(rank_offset),
        "world_size": int(world_size),
        "group_name": group_name,
        "backend": backend,
    }


def destroy_weights_update_group_body(*, group_name: str = WEIGHT_UPDATE_GROUP) -> dict[str, Any]:
    """Leave the weight-update group (before re-initialising it with a different membership)."""
    return {"group_name": group_name}


def update_weights_from_distributed_body(
    *,
    names: Sequence[str],
    dtypes: Sequence[str],
    shapes: Sequence[Sequence[int]],
    group_name: str = WEIGHT_UPDATE_GROUP,
    flattened_bucket: bool = True,
    flush_cache: bool = True,
    weight_version: str | None = None,
    abort_all_requests: bool | None = None,
) -> dict[str, Any]:
    """Receive one bucket broadcast from rank 0 of the group: the tensors' names, dtypes (``"bfloat16"``) and shapes.

    With ``flattened_bucket`` the sender broadcasts one uint8 tensor (see :data:`FLATTENED_BUCKET`);
    without it, one broadcast per tensor in order.
    """
    if not (len(names) == len(dtypes) == len(shapes)):
        raise ValueError(f"names/dtypes/shapes differ in length: {len(names)}/{len(dtypes)}/{len(shapes)}")
    body: dict[str, Any] = {
        "names": list(names),
        "dtypes": [d.removeprefix("torch.") for d in dtypes],
        "shapes": [[int(s) for s in shape] for shape in shapes],
        "group_name": group_name,
        "flush_cache": bool(flush_cache),
    }
    if flattened_bucket:
        body["load_format"] = FLATTENED_BUCKET
    if weight_version is not None:
        body["weight_version"] = str(weight_version)
    if abort_all_requests is not None:
        body["abort_all_requests"] = bool(abort_all_requests)
    return body


def update_weights_from_tensor_body(
    *,
    serialized_named_tensors: Sequence[str],
    load_format: str | None = None,
    flush_cache: bool = True,
    weight_version: str | None = None,
) -> dict[str, Any]:
    """Colocated weight update: one base64 string per TP rank of SGLang's serialized (CUDA-IPC) named tensors.

    The payload is produced by SGLang's own ``MultiprocessingSerializer`` on the trainer
    side (GPU only); this builder only fixes the envelope.
    """
    body: dict[str, Any] = {
        "serialized_named_tensors": list(serialized_named_tensors),
        "flush_cache": bool(flush_cache),
    }
    if load_format is not None:
        body["load_format"] = load_format
    if weight_version is not None:
        body["weight_version"] = str(weight_version)
    return body


def release_memory_occupation_body(*, tags: Sequence[str] | None = None) -> dict[str, Any]:
    """Free the engine's GPU memory while the colocated actor trains (``tags``: e.g. ``weights``, ``kv_cache``)."""
    return {} if tags is None else {"tags": list(tags)}


def resume_memory_occupation_body(*, tags: Sequence[str] | None = None) -> dict[str, Any]:
    """Take the released memory back before the next rollout."""
    return {} if tags is None else {"tags": list(tags)}


def pause_generation_body(*, mode: PauseMode = "abort") -> dict[str, Any]:
    """Stop generating before a weight sync: ``abort`` returns running requests, ``retract``/``in_place`` keep them."""
    return {"mode": mode}


def continue_generation_body() -> dict[str, Any]:
    """Resume generation after a sync."""
    return {}


def update_weight_version_body(*, new_version: str, abort_all_requests: bool = False) -> dict[str, Any]:
    """Label the engine's weights (reported with every response as ``meta_info.weight_version``)."""
    return {"new_version": str(new_version), "abort_all_requests": bool(abort_all_requests)}


def weights_checker_body(*, action: str = "checksum") -> dict[str, Any]:
    """Ask every rank of an engine for the checksums of its weights (``[rollout] check_weight_sync``)."""
    return {"action": action}


def abort_request_body(*, rid: str | None = None, abort_all: bool = False) -> dict[str, Any]:
    """Abort one request by id, or all."""
    body: dict[str, Any] = {"abort_all": bool(abort_all)}
    if rid is not None:
        body["rid"] = rid
    return body
