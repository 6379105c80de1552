"""The embedded engine's server over real HTTP: SGLang's endpoints, errors, auth, pause and weights."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from miles.engine.core import Engine, GenerationRequest
from miles.engine.sampling import SamplingParams
from miles.sglang import protocol as proto
from miles.transfer.checksum import tensor_checksum
from tests.unit.engine.server_harness import ServerThread

KEY = "test-key"


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path) -> Iterator[ServerThread]:
    torch.set_num_threads(1)
    s = ServerThread(Engine(tiny_model_dir, seed=0, max_batch_size=8), api_key=KEY, batch_wait_ms=20)
    yield s
    s.stop()


def greedy(n: int = 6) -> dict:
    return proto.sampling_params(max_new_tokens=n, temperature=0.0)


def test_api_key_guards_everything_but_health(srv: ServerThread) -> None:
    assert srv.call("GET", "/model_info") == (401, {"error": "Unauthorized"})
    assert srv.call("POST", "/generate", {"input_ids": [4, 5]}, key="wrong")[0] == 401
    assert srv.call("GET", "/health")[0] == 200
    assert srv.call("GET", "/health_generate")[0] == 200
    status, info = srv.call("GET", "/model_info", key=KEY)
    assert status == 200 and isinstance(info, dict)
    assert info["is_generation"] is True and info["architectures"] == ["Qwen2ForCausalLM"]


def test_generate_single_batched_text_and_n(srv: ServerThread) -> None:
    engine = srv.server.engine
    status, out = srv.call("POST", "/generate", proto.generate_body(input_ids=[4, 5, 13], sampling=greedy()), key=KEY)
    assert status == 200 and isinstance(out, dict)
    direct = engine.generate([GenerationRequest([4, 5, 13], SamplingParams(max_new_tokens=6, temperature=0.0))])[0]
    assert out["output_ids"] == direct.output_ids and out["text"] == direct.text
    meta = out["meta_info"]
    assert [t for _, t, _ in meta["output_token_logprobs"]] == direct.output_ids
    assert [lp for lp, _, _ in meta["output_token_logprobs"]] == pytest.approx(direct.output_logprobs, abs=1e-6)
    assert meta["finish_reason"]["type"] in ("stop", "length") and meta["completion_tokens"] == len(direct.output_ids)
    assert meta["prompt_tokens"] == 3 and meta["weight_version"] == "default"

    prompts = [[4, 5], [6, 7, 8, 9], [10]]
    status, outs = srv.call(
        "POST", "/generate", proto.generate_body(input_ids=prompts, sampling=[greedy(4), greedy(5), greedy(3)]), key=KEY
    )
    assert status == 200 and isinstance(outs, list) and len(outs) == 3
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [2, 4, 1]

    status, by_text = srv.call("POST", "/generate", {"text": "12+3=", "sampling_params": greedy()}, key=KEY)
    assert status == 200 and isinstance(by_text, dict)
    ids = engine.encode("12+3=")
    assert (
        by_text["output_ids"]
        == engine.generate([GenerationRequest(ids, SamplingParams(max_new_tokens=6, temperature=0.0))])[0].output_ids
    )
    assert "output_token_logprobs" not in by_text["meta_info"]  # return_logprob not asked

    sampling = proto.sampling_params(max_new_tokens=5, temperature=1.0, n=3, sampling_seed=11)
    status, many = srv.call("POST", "/generate", proto.generate_body(input_ids=[4, 5], sampling=sampling), key=KEY)
    assert status == 200 and isinstance(many, list) and len(many) == 3
    assert len({tuple(o["output_ids"]) for o in many}) > 1


def test_concurrent_single_requests_are_batched_and_correct(srv: ServerThread) -> None:
    prompts = [[4 + i, 5, 13] for i in range(8)]
    expect = [
        o.output_ids
        for o in srv.server.engine.generate(
            [GenerationRequest(p, SamplingParams(max_new_tokens=6, temperature=0.0)) for p in prompts]
        )
    ]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda p: srv.call("POST", "/generate", proto.generate_body(input_ids=p, sampling=greedy()), key=KEY),
                prompts,
            )
        )
    assert [r[1]["output_ids"] for r in results] == expect  # type: ignore[index]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"input_ids": [4], "sampling_params": {"temprature": 1}}, "unknown sampling_params"),
        ({"sampling_params": {}}, "Either text or input_ids"),
        ({"input_ids": [4], "stream": True}, "stream"),
        ({"input_ids": [4], "sampling_params": {"top_p": 2.0}}, "top_p"),
        ({"input_ids": [10**6]}, "vocabulary"),
        ({"input_ids": [[4], [5]], "sampling_params": [{}, {}, {}]}, "3 entries for 2"),
    ],
)
def test_bad_generate_requests_get_sglang_error_bodies(srv: ServerThread, body: dict, message: str) -> None:
    status, out = srv.call("POST", "/generate", body, key=KEY)
    assert status == 400 and isinstance(out, dict) and message in out["error"]["message"]


def test_pause_holds_requests_and_abort_answers_them(srv: ServerThread) -> None:
    body = proto.generate_body(input_ids=[4, 5], sampling=greedy(4))
    assert srv.call("POST", "/pause_generation", proto.pause_generation_body(mode="in_place"), key=KEY) == (
        200,
        {"message": "Generation paused successfully.", "status": "ok"},
    )
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = pool.submit(srv.call, "POST", "/generate", body, KEY)
        time.sleep(0.5)
        assert not held.done()  # paused: queued, not generated
        assert srv.call("POST", "/continue_generation", proto.continue_generation_body(), key=KEY)[0] == 200
        status, out = held.result(30)
        assert status == 200 and out["meta_info"]["finish_reason"]["type"] != "abort"  # type: ignore[index]

        srv.call("POST", "/pause_generation", proto.pause_generation_body(mode="in_place"), key=KEY)
        queued = pool.submit(srv.call, "POST", "/generate", body, KEY)
        time.sleep(0.3)
        srv.call("POST", "/pause_generation", proto.pause_generation_body(mode="abort"), key=KEY)
        status, out = queued.result(30)
        assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "abort"  # type: ignore[index]
        srv.call("POST", "/continue_generation", proto.continue_generation_body(), key=KEY)
    assert srv.call("POST", "/generate", body, key=KEY)[0] == 200


def test_release_and_resume_memory(srv: ServerThread) -> None:
    assert srv.call("POST", "/release_memory_occupation", proto.release_memory_occupation_body(), key=KEY) == (
        200,
        None,
    )
    status, out = srv.call("POST", "/generate", proto.generate_body(input_ids=[4], sampling=greedy(2)), key=KEY)
    assert status == 400 and "released" in out["error"]["message"]  # type: ignore[index]
    assert srv.call("POST", "/resume_memory_occupation", proto.resume_memory_occupation_body(), key=KEY) == (200, None)
    assert srv.call("POST", "/generate", proto.generate_body(input_ids=[4], sampling=greedy(2)), key=KEY)[0] == 200


def test_weights_by_name_checksums_disk_update_and_version(srv: ServerThread, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    engine = srv.server.engine
    name = "model.layers.1.self_attn.o_proj.weight"
    state = {k: v.clone() for k, v in engine.state().items()}
    status, rows = srv.call("POST", "/get_weights_by_name", {"name": name, "truncate_size": 1000}, key=KEY)
    assert status == 200 and torch.equal(torch.tensor(rows), state[name])
    status, check = srv.call("POST", "/weights_checker", {"action": "checksum"}, key=KEY)
    assert status == 200 and check["success"] is True  # type: ignore[index]
    assert check["ranks"][0]["checksums"][name] == tensor_checksum(state[name])  # type: ignore[index]

    body = proto.generate_body(input_ids=[4, 5, 13], sampling=greedy(8))
    before = srv.call("POST", "/generate", body, key=KEY)[1]["output_ids"]  # type: ignore[index]
    noisy = {k: v + 0.3 * torch.randn_like(v) for k, v in state.items()}
    save_file(noisy, str(tmp_path / "model.safetensors"))
    status, out = srv.call(
        "POST", "/update_weights_from_disk", {"model_path": str(tmp_path), "weight_version": "7"}, key=KEY
    )
    assert status == 200 and out == {
        "success": True,
        "message": "Succeeded to update model weights. Weight version updated to 7.",
        "num_paused_requests": 0,
    }
    changed = srv.call("POST", "/generate", body, key=KEY)[1]
    assert changed["output_ids"] != before and changed["meta_info"]["weight_version"] == "7"  # type: ignore[index]
    engine.load_weights(state.items())
    assert srv.call("POST", "/generate", body, key=KEY)[1]["output_ids"] == before  # type: ignore[index]

    status, out = srv.call("POST", "/update_weight_version", proto.update_weight_version_body(new_version="8"), key=KEY)
    assert status == 200 and out["new_version"] == "8"  # type: ignore[index]
    assert srv.call("GET", "/model_info", key=KEY)[1]["weight_version"] == "8"  # type: ignore[index]


def test_weight_paths_that_cannot_work_here_fail_clearly(srv: ServerThread) -> None:
    status, out = srv.call(
        "POST",
        "/update_weights_from_tensor",
        proto.update_weights_from_tensor_body(serialized_named_tensors=["AAAA"]),
        key=KEY,
    )
    assert status == 400 and out["success"] is False and "Failed to update weights from tensor" in out["message"]  # type: ignore[index]
    status, out = srv.call(
        "POST",
        "/update_weights_from_distributed",
        proto.update_weights_from_distributed_body(names=["x"], dtypes=["float32"], shapes=[[1]], group_name="nope"),
        key=KEY,
    )
    assert status == 400 and "init_weights_update_group" in out["message"]  # type: ignore[index]
    status, out = srv.call("POST", "/update_weights_from_disk", {"model_path": "/nonexistent"}, key=KEY)
    assert status == 400 and out["success"] is False  # type: ignore[index]
    for method in ("GET", "POST"):
        status, text = srv.call(method, "/flush_cache", key=KEY)
        assert status == 200 and str(text).startswith("Cache flushed.")
