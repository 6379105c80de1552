"""The embedded engine's HTTP bodies match SGLang's (same keys and types) for every endpoint it serves.

The pinned SGLang wheel is read with ``ast`` (``tests/sglang_wheel.py``, shared with
the SGLang conformance tests), never imported:

* routes: every path the embedded server serves exists in SGLang's
  ``http_server.py`` with the same HTTP methods;
* requests: every field the server reads from a body is a field of SGLang's
  request class for that route (``io_struct.py``), and bodies holding just
  SGLang's fields (built by ``miles.sglang.protocol``) are accepted;
* responses: the keys of each JSON answer are those of the dict SGLang's
  handler returns, ``/generate``'s ``meta_info`` keys are keys SGLang's tokenizer
  manager sets, finish reasons are SGLang's ``to_json`` shapes, and values
  conform to the annotations of SGLang's ``*ReqOutput`` classes.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from miles.engine.core import Engine
from miles.engine.sampling import DEFAULT_ONLY_KEYS, SUPPORTED_KEYS
from miles.job.ports import free_port
from miles.sglang import protocol as proto
from miles.sglang.wheel import SglangSource, conforms
from miles.transfer.bucket import Bucket
from miles.transfer.colocate import bucket_metadata, serialize_bucket
from tests.sglang_wheel import pinned_source
from tests.unit.engine.server_harness import ServerThread

KEY = "k"
SENDER = """
import json, sys
from safetensors.torch import load_file
from miles.transfer.sync import WeightSync
url, key, port, model_dir = sys.argv[1:5]
answers = []
class Recording(WeightSync):
    def _decode(self, url, path, status, raw):  # every answer, the pipelined bucket updates' included
        answer = super()._decode(url, path, status, raw)
        answers.append((path, answer))
        return answer
ws = Recording([url], "127.0.0.1", int(port), api_key=key, group_name="bodies_test_group", bucket_bytes=1 << 30)
ws.connect()
ws.sync(load_file(model_dir + "/model.safetensors").items(), weight_version=5)
ws.close()
print(json.dumps(answers))
"""
TOKENIZER_MANAGER = "sglang/srt/managers/tokenizer_manager.py"
SCHEDULE_BATCH = "sglang/srt/managers/schedule_batch.py"
OUTPUT_CLASS = {
    "/init_weights_update_group": "InitWeightsUpdateGroupReqOutput",
    "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqOutput",
    "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqOutput",
    "/update_weights_from_tensor": "UpdateWeightsFromTensorReqOutput",
    "/update_weights_from_disk": "UpdateWeightFromDiskReqOutput",
}
"""Routes whose JSON answer is SGLang's output class flattened into a dict."""


@pytest.fixture(scope="module")
def sgl() -> SglangSource:
    return pinned_source()


@pytest.fixture(scope="module")
def tour(tiny_model_dir: Path) -> Iterator[tuple[ServerThread, dict[str, tuple[int, Any]]]]:
    """Call every endpoint once with SGLang-shaped bodies (weight sync over a real gloo group included)."""
    torch.set_num_threads(1)
    srv = ServerThread(Engine(tiny_model_dir, seed=0), api_key=KEY, batch_wait_ms=1)
    seen: dict[str, tuple[int, Any]] = {}

    def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        seen[path] = srv.call(method, path, body, key=KEY)
        return seen[path]

    sampling = proto.sampling_params(
        max_new_tokens=4,
        temperature=0.8,
        top_p=0.9,
        top_k=5,
        stop=["*"],
        stop_token_ids=[2],
        sampling_seed=3,
        no_stop_trim=True,
        skip_special_tokens=True,
    )
    call("GET", "/health")
    call("GET", "/health_generate")
    call("GET", "/ready")
    call("GET", "/model_info")
    call("GET", "/get_model_info")
    call("GET", "/server_info")
    call("GET", "/get_server_info")
    call(
        "POST",
        "/generate",
        proto.generate_body(input_ids=[[4, 5], [6]], sampling=[sampling, sampling], return_logprob=True, rid="r"),
    )
    call("POST", "/flush_cache")
    call("POST", "/pause_generation", proto.pause_generation_body(mode="in_place"))
    call("POST", "/continue_generation", proto.continue_generation_body())
    call("POST", "/abort_request", proto.abort_request_body(rid="nothing"))
    call("POST", "/release_memory_occupation", proto.release_memory_occupation_body(tags=["kv_cache"]))
    call("POST", "/resume_memory_occupation", proto.resume_memory_occupation_body(tags=["kv_cache"]))
    call("POST", "/update_weight_version", proto.update_weight_version_body(new_version="3"))
    call("POST", "/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": 4})
    call("POST", "/weights_checker", {"action": "checksum"})
    # a real colocated bucket (shared-memory CPU tensor) in SGLang's serialized form
    bucket = Bucket()
    bucket.add("model.norm.weight", srv.server.engine.state()["model.norm.weight"].clone())
    flat = bucket.flatten()
    call(
        "POST",
        "/update_weights_from_tensor",
        proto.update_weights_from_tensor_body(
            serialized_named_tensors=[serialize_bucket(flat, bucket_metadata(bucket))],
            load_format=proto.FLATTENED_BUCKET,
            weight_version="2",
        ),
    )
    call("POST", "/update_weights_from_disk", {"model_path": str(tiny_model_dir), "weight_version": "4"})

    # the weight-update group: the trainer side must be another process (a process registers a group name once)
    result = subprocess.run(
        [sys.executable, "-c", SENDER, srv.url, KEY, str(free_port()), str(tiny_model_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for path, answer in json.loads(result.stdout.strip().splitlines()[-1]):
        seen[path] = (200, answer)
    yield srv, seen
    srv.stop()


def _served(srv: ServerThread) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for route in srv.server.app().router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method != "HEAD" and not path.startswith("/miles/"):
            out.setdefault(path, set()).add(route.method)
    return out


def test_every_served_route_is_sglangs_with_the_same_methods(tour, sgl: SglangSource) -> None:  # type: ignore[no-untyped-def]
    srv, seen = tour
    served = _served(srv)
    assert len(served) >= 20
    for path, methods in served.items():
        assert path in sgl.routes, f"{path} is not an SGLang {sgl.version} route"
        assert methods == set(sgl.routes[path].methods), (
            f"{path}: {sorted(methods)} vs SGLang {sorted(sgl.routes[path].methods)}"
        )
    assert set(served) <= set(seen), f"the tour missed {sorted(set(served) - set(seen))}"


def test_every_field_read_is_a_field_of_sglangs_request_class(tour, sgl: SglangSource) -> None:  # type: ignore[no-untyped-def]
    srv, seen = tour
    checked = 0
    for path, fields in srv.server.fields_read.items():
        if path.startswith("/miles/") or not fields:
            continue
        cls = sgl.routes[path].body_class
        if path == "/generate":
            cls = "GenerateReqInput"
            known = set(_dataclass_fields(sgl, cls))
        else:
            assert cls is not None, f"{path} reads {sorted(fields)} but SGLang's route takes no body"
            cls = cls.removeprefix("Optional[").removesuffix("]")
            known = set(sgl.request_classes[cls].fields)
        assert fields <= known, f"{path} reads {sorted(fields - known)}, not fields of SGLang's {cls}"
        checked += 1
    assert checked >= 12
    assert SUPPORTED_KEYS | set(DEFAULT_ONLY_KEYS) <= set(sgl.sampling_params) | {"stop_regex"}


def test_bodies_of_only_sglang_fields_are_accepted(tour) -> None:  # type: ignore[no-untyped-def]
    _, seen = tour
    refused = {p: r for p, r in seen.items() if r[0] != 200}
    assert not refused, refused


def test_json_answers_have_sglangs_keys(tour, sgl: SglangSource) -> None:  # type: ignore[no-untyped-def]
    _, seen = tour
    handlers = _handlers(sgl)
    compared = 0
    for path, (_, body) in seen.items():
        if path == "/generate" or not isinstance(body, dict) or path in ("/server_info", "/get_server_info"):
            continue
        literal_sets, extras = _returned_keys(sgl, handlers, handlers[path])
        keys = set(body)
        assert any(lit <= keys <= lit | extras for lit in literal_sets), (
            f"{path} answers keys {sorted(keys)}; SGLang's handler returns {[sorted(s) for s in literal_sets]}"
        )
        compared += 1
    assert compared >= 10
    for path in ("/release_memory_occupation", "/resume_memory_occupation"):
        assert seen[path] == (200, None)  # SGLang's handler returns None: JSON null


def test_json_answer_values_conform_to_sglangs_output_classes(tour, sgl: SglangSource) -> None:  # type: ignore[no-untyped-def]
    _, seen = tour
    for path, cls in OUTPUT_CLASS.items():
        body = seen[path][1]
        fields = sgl.request_classes[cls].fields
        for key, value in body.items():
            assert key in fields, f"{path}: {key} is not a field of {cls}"
            assert conforms(value, fields[key].annotation), f"{path}: {key}={value!r} vs {fields[key].annotation_text}"
    weights = seen["/get_weights_by_name"][1]
    assert conforms(weights, sgl.request_classes["GetWeightsByNameReqOutput"].fields["parameter"].annotation)
    check = seen["/weights_checker"][1]
    info_fields = sgl.request_classes["ChecksumInfo"].fields
    par_fields = sgl.request_classes["ParallelismInfo"].fields
    for rank in check["ranks"]:
        assert set(rank) == set(info_fields)
        assert conforms(rank["checksums"], info_fields["checksums"].annotation)
        assert set(rank["parallelism_info"]) == set(par_fields)
        assert all(conforms(v, par_fields[k].annotation) for k, v in rank["parallelism_info"].items())


def test_generate_answer_is_sglangs(tour, sgl: SglangSource) -> None:  # type: ignore[no-untyped-def]
    _, seen = tour
    status, outs = seen["/generate"]
    assert status == 200 and isinstance(outs, list) and len(outs) == 2
    tree = sgl.tree(TOKENIZER_MANAGER)
    out_dicts = [keys for keys in _dict_literal_keys(tree) if "meta_info" in keys]
    always, allowed = _meta_info_keys(tree)
    finish_shapes = [k for k in _dict_literal_keys(sgl.tree(SCHEDULE_BATCH)) if "type" in k]
    for out in outs:
        assert set(out) in [set(k) for k in out_dicts]
        assert isinstance(out["text"], str) and all(isinstance(t, int) for t in out["output_ids"])
        meta = out["meta_info"]
        assert always <= set(meta) <= allowed, (sorted(always - set(meta)), sorted(set(meta) - allowed))
        assert set(meta["finish_reason"]) in [set(k) for k in finish_shapes]
        assert meta["finish_reason"]["type"] in ("stop", "length", "abort")
        triples = meta["output_token_logprobs"]
        assert len(triples) == len(out["output_ids"]) == meta["output_token_logprobs_length"]
        for lp, tok, text in triples:
            assert isinstance(lp, float) and isinstance(tok, int) and text is None
        assert isinstance(meta["weight_version"], str) and isinstance(meta["prompt_tokens"], int)


# ---------------------------------------------------------------------- reading SGLang's source


def _dataclass_fields(sgl: SglangSource, name: str) -> dict[str, ast.expr]:
    """Fields of a ``@dataclass`` in io_struct.py (GenerateReqInput is one, not a msgspec struct)."""
    for node in sgl.tree("sglang/srt/managers/io_struct.py").body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return {
                s.target.id: s.annotation
                for s in node.body
                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
            }
    raise KeyError(name)


def _handlers(sgl: SglangSource) -> dict[str, ast.AsyncFunctionDef | ast.FunctionDef]:
    """Path -> the handler function of http_server.py (and name -> function, for handlers that delegate)."""
    out: dict[str, Any] = {}
    for node in ast.walk(sgl.tree("sglang/srt/entrypoints/http_server.py")):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.setdefault(node.name, node)
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and dec.args and isinstance(dec.args[0], ast.Constant):
                    out[str(dec.args[0].value)] = node
    return out


def _dict_literal_keys(node: ast.AST) -> list[set[str]]:
    found = []
    for n in ast.walk(node):
        if (
            isinstance(n, ast.Dict)
            and n.keys
            and all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in n.keys)
        ):
            found.append({str(k.value) for k in n.keys if isinstance(k, ast.Constant)})
    return found


def _returned_keys(sgl: SglangSource, handlers: dict[str, Any], fn: Any) -> tuple[list[set[str]], set[str]]:
    """The key sets of the dict literals a handler builds, plus keys it adds by subscript; follows delegation."""
    literals = _dict_literal_keys(fn)
    extras = {
        str(t.slice.value)
        for n in ast.walk(fn)
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant)
    }
    if not literals:
        for n in ast.walk(fn):
            if (
                isinstance(n, ast.Call)
                and isinstance(n.func, ast.Name)
                and n.func.id in handlers
                and handlers[n.func.id] is not fn
            ):
                lit, ext = _returned_keys(sgl, handlers, handlers[n.func.id])
                literals += lit
                extras |= ext
    return literals, extras


def _meta_info_keys(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(keys every answer's meta_info has, every key SGLang's tokenizer manager may put in it)."""
    always: set[str] = set()
    allowed: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Assign):
            for t in n.targets:
                if isinstance(t, ast.Name) and t.id == "meta_info" and isinstance(n.value, ast.Dict):
                    keys = {str(k.value) for k in n.value.keys if isinstance(k, ast.Constant)}
                    if {"id", "finish_reason"} <= keys:
                        always |= keys
                    allowed |= keys
                if (
                    isinstance(t, ast.Subscript)
                    and isinstance(t.value, ast.Name)
                    and t.value.id == "meta_info"
                    and isinstance(t.slice, ast.Constant)
                ):
                    allowed.add(str(t.slice.value))
        if (
            isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and n.func.attr == "update"
            and isinstance(n.func.value, ast.Name)
            and n.func.value.id == "meta_info"
            and n.args
            and isinstance(n.args[0], ast.Dict)
        ):
            keys = {str(k.value) for k in n.args[0].keys if isinstance(k, ast.Constant)}
            allowed |= keys
            if "completion_tokens" in keys:
                always |= keys
    return always, allowed
