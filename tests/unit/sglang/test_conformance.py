"""Every request miles sends to SGLang matches the pinned release's own request classes and route table.

The pinned wheel is downloaded (``pip download --no-deps``, not installed) and
read with ``ast``: ``sglang/srt/entrypoints/http_server.py`` for paths, methods
and the class each body is parsed into; ``sglang/srt/managers/io_struct.py``
for those classes' fields; ``sglang/srt/sampling/sampling_params.py`` for the
sampling keys. Bumping ``SGLANG_PIN`` re-runs all of it against the new release.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from miles.sglang import protocol as proto
from miles.sglang.flags import SGLANG_PIN
from miles.sglang.wheel import SglangSource, conforms
from tests.sglang_wheel import pinned_source


@pytest.fixture(scope="module")
def sgl() -> SglangSource:
    source = pinned_source()
    assert source.version == SGLANG_PIN
    return source


SAMPLING_FULL = proto.sampling_params(
    max_new_tokens=16,
    temperature=0.7,
    top_p=0.9,
    top_k=20,
    stop=["\n\n", "</answer>"],
    stop_token_ids=[2, 7],
    sampling_seed=123,
    n=4,
    skip_special_tokens=False,
    no_stop_trim=True,
    ignore_eos=False,
)

BODIES: list[tuple[proto.Endpoint, dict[str, Any]]] = [
    (proto.GENERATE, proto.generate_body(input_ids=[1, 2, 3], sampling=SAMPLING_FULL)),
    (proto.GENERATE, proto.generate_body(input_ids=[[1, 2], [3, 4, 5]], sampling=[SAMPLING_FULL, SAMPLING_FULL])),
    (proto.GENERATE, proto.generate_body(text="1+1=", sampling=proto.sampling_params(max_new_tokens=4), rid="r-1")),
    (proto.GENERATE, proto.generate_body(text=["a", "b"], sampling=SAMPLING_FULL, return_logprob=False, stream=True)),
    (proto.GENERATE, proto.generate_body(input_ids=[5], sampling=SAMPLING_FULL, logprob_start_len=0)),
    (
        proto.INIT_WEIGHTS_UPDATE_GROUP,
        proto.init_weights_update_group_body(
            master_address="10.0.0.1",
            master_port=29600,
            rank_offset=1,
            world_size=9,
            group_name="miles",
            backend="gloo",
        ),
    ),
    (proto.DESTROY_WEIGHTS_UPDATE_GROUP, proto.destroy_weights_update_group_body(group_name="miles")),
    (
        proto.UPDATE_WEIGHTS_FROM_DISTRIBUTED,
        proto.update_weights_from_distributed_body(
            names=["model.embed_tokens.weight", "lm_head.weight"],
            dtypes=["torch.bfloat16", "float32"],
            shapes=[[512, 64], [512, 64]],
            group_name="miles",
            weight_version="3",
            abort_all_requests=False,
        ),
    ),
    (
        proto.UPDATE_WEIGHTS_FROM_DISTRIBUTED,
        proto.update_weights_from_distributed_body(
            names=["w"], dtypes=["float16"], shapes=[[2]], flattened_bucket=False, flush_cache=False
        ),
    ),
    (
        proto.UPDATE_WEIGHTS_FROM_TENSOR,
        proto.update_weights_from_tensor_body(
            serialized_named_tensors=["gASV...", "gASV..."], load_format="flattened_bucket", weight_version="3"
        ),
    ),
    (proto.RELEASE_MEMORY_OCCUPATION, proto.release_memory_occupation_body()),
    (proto.RELEASE_MEMORY_OCCUPATION, proto.release_memory_occupation_body(tags=["weights", "kv_cache"])),
    (proto.RESUME_MEMORY_OCCUPATION, proto.resume_memory_occupation_body(tags=["weights"])),
    *[(proto.PAUSE_GENERATION, proto.pause_generation_body(mode=m)) for m in ("abort", "retract", "in_place")],
    (proto.CONTINUE_GENERATION, proto.continue_generation_body()),
    (proto.UPDATE_WEIGHT_VERSION, proto.update_weight_version_body(new_version="7")),
    (proto.ABORT_REQUEST, proto.abort_request_body(rid="r-1")),
    (proto.ABORT_REQUEST, proto.abort_request_body(abort_all=True)),
]


def test_every_endpoint_exists_with_its_method_and_body_class(sgl: SglangSource) -> None:
    for ep in proto.ENDPOINTS:
        route = sgl.routes.get(ep.path)
        assert route is not None, f"SGLang {sgl.version} has no route {ep.path}"
        assert ep.method in route.methods, f"{ep.path}: SGLang accepts {sorted(route.methods)}, miles uses {ep.method}"
        assert route.body_class == ep.body_class, (
            f"{ep.path}: SGLang parses the body as {route.body_class}, miles builds {ep.body_class}"
        )


@pytest.mark.parametrize(("endpoint", "body"), BODIES, ids=lambda v: getattr(v, "path", None) or "body")
def test_body_matches_sglang_request_class(sgl: SglangSource, endpoint: proto.Endpoint, body: dict) -> None:
    assert endpoint.body_class is not None
    cls = sgl.request_classes[endpoint.body_class]
    unknown = set(body) - set(cls.fields)
    assert not unknown, f"{endpoint.path}: {sorted(unknown)} are not fields of SGLang's {cls.name}"
    missing = cls.required - set(body)
    assert not missing, f"{endpoint.path}: required fields {sorted(missing)} of {cls.name} are missing"
    for key, value in body.items():
        ann = cls.fields[key].annotation
        assert conforms(value, ann), (
            f"{endpoint.path}: {key}={value!r} does not fit {cls.name}.{key}: {ast.unparse(ann)}"
        )


def test_sampling_params_are_sglang_sampling_params(sgl: SglangSource) -> None:
    fields = sgl.sampling_params
    unknown = set(SAMPLING_FULL) - set(fields)
    assert not unknown, f"{sorted(unknown)} are not SGLang sampling params"
    for key, value in SAMPLING_FULL.items():
        assert conforms(value, fields[key].annotation), (
            f"sampling_params.{key}={value!r}: {fields[key].annotation_text}"
        )


def test_weight_sync_dtypes_are_names_sglang_resolves_with_getattr_torch() -> None:
    """SGLang turns each dtype string into ``getattr(torch, name)``; miles sends torch's own names."""
    body = proto.update_weights_from_distributed_body(
        names=["a", "b", "c"], dtypes=[str(torch.bfloat16), str(torch.float32), "float16"], shapes=[[1], [1], [1]]
    )
    for name in body["dtypes"]:
        assert isinstance(getattr(torch, name), torch.dtype)


def test_flattened_bucket_is_a_load_format_sglang_handles(sgl: SglangSource) -> None:
    updater = sgl.text("sglang/srt/model_executor/model_runner_components/weight_updater.py")
    assert f'load_format == "{proto.FLATTENED_BUCKET}"' in updater
    bucket = sgl.text("sglang/srt/weight_sync/tensor_bucket.py")
    # The wire format miles' sender must produce: each tensor's bytes (uint8 view), concatenated in order.
    assert "tensor.flatten().view(torch.uint8)" in bucket and "torch.cat(flattened_tensors, dim=0)" in bucket


def test_conformance_checker_rejects_what_sglang_would_reject(sgl: SglangSource) -> None:
    """The checker itself can fail: wrong type, unknown field, missing required field."""
    cls = sgl.request_classes["InitWeightsUpdateGroupReqInput"]
    assert not conforms("29600", cls.fields["master_port"].annotation)
    assert not conforms(True, cls.fields["world_size"].annotation)
    pause = sgl.request_classes["PauseGenerationReqInput"]
    assert not conforms("stop", pause.fields["mode"].annotation)
    assert {"master_address", "master_port", "rank_offset", "world_size"} <= cls.required
    upd = sgl.request_classes["UpdateWeightsFromDistributedReqInput"]
    assert not conforms([[1, 2], "3"], upd.fields["shapes"].annotation)


BODY_PATHS = {ep.path for ep in proto.ENDPOINTS if ep.body_class is not None}
_PATH_LITERAL = re.compile(r"""["'](/[a-z_]+)["']""")


def test_sglang_bodies_are_built_only_in_the_protocol_module() -> None:
    """One place builds each body: other miles modules use ``miles.sglang.protocol`` instead of spelling SGLang paths.

    Only routes that take a body count (health checks are plain GETs). The embedded engine's
    server declares the same routes to *serve* them, so it may name them.
    """
    root = Path(proto.__file__).resolve().parent.parent
    allowed = {Path(proto.__file__).resolve(), (root / "engine" / "server.py").resolve()}
    offenders = []
    for path in root.rglob("*.py"):
        if path.resolve() in allowed:
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if any(m in BODY_PATHS for m in _PATH_LITERAL.findall(line)):
                offenders.append(f"{path.relative_to(root.parent)}:{lineno}: {line.strip()}")
    assert not offenders, "SGLang endpoints spelled outside miles/sglang/protocol.py:\n" + "\n".join(offenders)
