"""miles' launcher, client and weight sync against a real server: SGLang 0.5.20 on CPU, and the embedded engine.

Each test runs once per engine kind (``kind`` is ``sglang`` or ``embedded``);
one server per kind serves the whole module, in the order written (the kill
test last, since it restarts the engine). On a 2-core machine the SGLang server
takes about a minute to import before it is healthy.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from miles.job import rundir
from miles.job.ports import free_port
from miles.rollout.client import BlockingRolloutClient
from miles.rollout.generate import GenerateFnInput, GenerateFnOutput, GenerateState, generate_samples
from miles.sample import Sample
from miles.sglang import launcher as sl
from miles.sglang import protocol as proto
from miles.sglang import router as sr
from miles.spec.tables import ModelConfig, RolloutConfig, SglangConfig, Spec
from miles.transfer.colocate import TensorSync
from miles.transfer.sync import WeightSync
from tests.sglang.sglang_servers import (
    SGLANG_PYTHON,
    SKIP_REASON,
    START_DEADLINE_S,
    driver_task,
    hf_greedy,
    hf_weights,
    launch,
    model_info,
    post,
    sglang_available,
    sharpened,
)

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

PROMPTS = ["12+7=", "3*(4+5)=", "99-13=", "8*8=", "(1+2)*3=", "7-2=", "45+55=", "6*7="]
RESPONSE_LEN = 12


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _samples(model_dir: Path, prompts: list[str] = PROMPTS) -> list[Sample]:
    tok = _tokenizer(model_dir)
    return [
        Sample(
            group_index=i,
            prompt_index=i,
            prompt=p,
            prompt_text=p,
            prompt_ids=tok(p, add_special_tokens=False)["input_ids"],
        )
        for i, p in enumerate(prompts)
    ]


def _greedy(max_len: int = RESPONSE_LEN) -> RolloutConfig:
    return RolloutConfig(rollout_temperature=0.0, rollout_max_response_len=max_len, rollout_seed=0)


def _generate(
    urls: list[str], api_key: str, samples: list[Sample], cfg: RolloutConfig, **kw: Any
) -> BlockingRolloutClient:
    """Generate ``samples``. Greedy runs are made reproducible the way SGLang can promise it on CPU (its
    deterministic-inference mode needs a GPU attention backend): the same computation every time, i.e. an empty
    prefix cache (a cached prompt prefill is a shorter extend, rounded differently) and one request at a time
    (SGLang batches concurrent requests by arrival, and a batch's shape changes its rounding)."""
    if cfg.rollout_temperature == 0.0:
        for url in urls:
            post(url, api_key, proto.FLUSH_CACHE)
        kw = {"batched": False, "max_concurrency": 1, **kw}
    client = BlockingRolloutClient(urls, api_key=api_key, timeout_s=120, **kw)
    try:
        client.generate(samples, cfg, rollout_id=0)
    finally:
        client.close()
    return client


def _outputs(samples: list[Sample]) -> list[tuple[list[int], list[float]]]:
    return [(s.response_ids, s.response_logprobs) for s in samples]


@pytest.fixture(scope="module")
def baseline(served: sl.EngineProcess, model_dir: Path) -> list[tuple[list[int], list[float]]]:
    """Greedy responses and logprobs of the engine's initial weights."""
    samples = _samples(model_dir)
    _generate([served.url], served.launch.api_key, samples, _greedy())
    return _outputs(samples)


def test_generate_with_logprobs(served: sl.EngineProcess, model_dir: Path, baseline: list) -> None:
    samples = _samples(model_dir)
    cfg = RolloutConfig(rollout_temperature=1.0, rollout_max_response_len=RESPONSE_LEN, rollout_seed=3)
    _generate([served.url], served.launch.api_key, samples, cfg)
    for s in samples:
        assert 0 < len(s.response_ids) <= RESPONSE_LEN
        assert len(s.response_logprobs) == len(s.response_ids)
        assert all(lp <= 0.0 for lp in s.response_logprobs)
        assert s.finish_reason in ("stop", "length")
    again = _samples(model_dir)
    _generate([served.url], served.launch.api_key, again, _greedy())
    assert _outputs(again) == baseline, "greedy generation is not reproducible"


def test_a_generate_function_drives_the_engine_token_in_token_out(served: sl.EngineProcess, model_dir: Path) -> None:
    """A user's generate function (Miles' contract) over the same client: turn 2 is generated from turn 1's ids
    and appended glue ids, masks mark the model's tokens; SGLang reuses the conversation's prefix from its cache."""
    tok = _tokenizer(model_dir)
    glue = tok("=1+", add_special_tokens=False)["input_ids"]
    cached: list[int] = []

    async def two_turns(input: GenerateFnInput) -> GenerateFnOutput:
        s, params = input.sample, {**input.sampling_params, "max_new_tokens": 4}
        first = await input.state.client.generate_turn(s.prompt_ids, params, session="c")
        ids = first.output_ids + glue
        second = await input.state.client.generate_turn(s.prompt_ids + ids, params, session="c")
        cached.append(second.cached_tokens)
        s.response_ids = ids + second.output_ids
        s.response_logprobs = first.logprobs + [0.0] * len(glue) + second.logprobs
        s.loss_mask = [1] * len(first.output_ids) + [0] * len(glue) + [1] * len(second.output_ids)
        s.turns = 2
        return GenerateFnOutput(samples=s)

    post(served.url, served.launch.api_key, proto.FLUSH_CACHE)
    cfg = RolloutConfig(rollout_temperature=1.0, rollout_max_response_len=12, rollout_seed=3)
    samples = _samples(model_dir, PROMPTS[:2])
    client = BlockingRolloutClient([served.url], api_key=served.launch.api_key, timeout_s=120)
    try:
        state = GenerateState(client.client, tok, cfg, rollout_id=0, weight_version=0)
        out = client.run(lambda _client: generate_samples(two_turns, "two_turns", samples, state))
    finally:
        client.close()
    for s in out:
        n_glue = s.loss_mask.count(0)
        assert n_glue == len(glue) and len(s.response_logprobs) == len(s.response_ids) == len(s.loss_mask)
        start = s.loss_mask.index(0)
        assert s.response_ids[start : start + n_glue] == glue  # the appended ids, as they were, in the sequence
    if served.launch.kind == "sglang":  # the radix cache held the prompt and turn 1 when turn 2 came
        assert all(c >= len(p) for c, p in zip(cached, (s.prompt_ids for s in out), strict=True)), cached


def test_wrong_api_key_is_refused(served: sl.EngineProcess) -> None:
    body = proto.generate_body(input_ids=[3, 4], sampling=proto.sampling_params(max_new_tokens=2))
    with pytest.raises(urllib.error.HTTPError) as err:
        post(served.url, "not-the-key", proto.GENERATE, body)
    assert err.value.code == 401


def _status_without_key(url: str, ep: proto.Endpoint) -> int:
    data = json.dumps({}).encode() if ep.method == "POST" else None
    req = urllib.request.Request(
        url + ep.path, data=data, method=ep.method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_every_endpoint_but_health_refuses_a_request_without_the_key(served: sl.EngineProcess) -> None:
    guarded = [ep for ep in proto.ENDPOINTS if not ep.path.startswith("/health")]
    assert {proto.UPDATE_WEIGHTS_FROM_TENSOR, proto.UPDATE_WEIGHTS_FROM_DISTRIBUTED, proto.GENERATE} <= set(guarded)
    refused = {ep.path: _status_without_key(served.url, ep) for ep in guarded}
    assert refused == {ep.path: 401 for ep in guarded}
    assert _status_without_key(served.url, proto.HEALTH) == 200  # probes carry no secret


def test_the_key_stays_out_of_the_engine_log_and_every_command_line(served: sl.EngineProcess) -> None:
    key = served.launch.api_key
    assert key and key not in " ".join(served.launch.argv)  # the server gets it through its environment ...
    text = served.launch.log_path.read_text()
    assert key not in text  # ... its log hides it (SGLang logs its arguments: they show "<engine key>") ...
    assert served.pid is not None
    tree = [served.pid, *_descendants(served.pid)]
    if served.launch.kind == "sglang":
        assert "<engine key>" in text and len(tree) > 1  # its scheduler and detokenizer processes too
    for pid in tree:  # ... and no process of the engine shows it to the node's other users
        assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), pid


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        out += [int(child), *_descendants(int(child))]
    return out


def test_weight_sync_follows_new_weights_and_restores_old_exactly(
    served: sl.EngineProcess, model_dir: Path, baseline: list
) -> None:
    original = hf_weights(model_dir)
    new = sharpened(original)
    sync = WeightSync(
        [served.url],
        "127.0.0.1",
        free_port(0),
        backend="gloo",
        api_key=served.launch.api_key,
        bucket_bytes=64 * 1024,
        group_name="miles-test-sync",
        timeout_s=120,
    )
    try:
        stats = sync.sync(list(new.items()), weight_version=1)
        assert stats.buckets > 1 and stats.tensors == len(new)
        samples = _samples(model_dir)
        _generate([served.url], served.launch.api_key, samples, _greedy())
        expected = hf_greedy(model_dir, new, samples, RESPONSE_LEN)
        assert [s.response_ids for s in samples] == expected, "greedy output does not follow the pushed weights"
        assert all(s.weight_version == 1 for s in samples)

        sync.sync(list(original.items()), weight_version=2)
        restored = _samples(model_dir)
        _generate([served.url], served.launch.api_key, restored, _greedy())
        assert _outputs(restored) == baseline, "pushing the original weights back did not restore the output"
        assert all(s.weight_version == 2 for s in restored)
    finally:
        sync.close()


def test_colocated_tensor_sync_follows_new_weights_and_restores_old_exactly(
    served: sl.EngineProcess, model_dir: Path, baseline: list
) -> None:
    """/update_weights_from_tensor in SGLang's flattened-bucket form; on CPU the buckets travel by shared memory."""
    original = hf_weights(model_dir)
    new = sharpened(original)
    sync = TensorSync([served.url], api_key=served.launch.api_key, bucket_bytes=64 * 1024, timeout_s=120)
    try:
        stats = sync.sync(list(new.items()), weight_version=11)
        assert stats.buckets > 1 and stats.tensors == len(new)
        samples = _samples(model_dir)
        _generate([served.url], served.launch.api_key, samples, _greedy())
        assert [s.response_ids for s in samples] == hf_greedy(model_dir, new, samples, RESPONSE_LEN)
        assert all(s.weight_version == 11 for s in samples)

        sync.sync(list(original.items()), weight_version=12)
        restored = _samples(model_dir)
        _generate([served.url], served.launch.api_key, restored, _greedy())
        assert _outputs(restored) == baseline, "pushing the original weights back did not restore the output"
        assert all(s.weight_version == 12 for s in restored)
    finally:
        sync.close()


def test_requests_wait_while_paused_and_finish_after_continue(served: sl.EngineProcess, model_dir: Path) -> None:
    key = served.launch.api_key
    assert post(served.url, key, proto.PAUSE_GENERATION, proto.pause_generation_body(mode="abort"))["status"] == "ok"
    samples = _samples(model_dir)
    done = threading.Event()

    def run() -> None:
        _generate([served.url], key, samples, _greedy(), max_retries=0)
        done.set()

    worker = threading.Thread(target=run, daemon=True)
    try:
        worker.start()
        assert not done.wait(3.0), "requests were generated while the engine was paused"
    finally:
        post(served.url, key, proto.CONTINUE_GENERATION, proto.continue_generation_body())
    assert done.wait(120), "requests did not finish after continue_generation"
    worker.join()
    assert all(s.finish_reason in ("stop", "length") and s.response_ids for s in samples)


def test_pause_during_a_rollout_aborts_and_the_client_resends(served: sl.EngineProcess, model_dir: Path) -> None:
    """``/pause_generation`` (abort) ends running requests with finish_reason abort; the client sends them again."""
    key = served.launch.api_key
    samples = _samples(model_dir, PROMPTS * 4)
    cfg = RolloutConfig(rollout_temperature=1.0, rollout_max_response_len=100, rollout_seed=5)
    client = BlockingRolloutClient([served.url], api_key=key, timeout_s=120, chunk_size=4, backoff_s=1.0)
    worker = threading.Thread(target=client.generate, args=(samples, cfg, 0), kwargs={"ignore_eos": True})
    worker.start()
    try:
        time.sleep(0.3)
        post(served.url, key, proto.PAUSE_GENERATION, proto.pause_generation_body(mode="abort"))
        assert worker.is_alive(), "the rollout finished before the pause; make it longer for this machine"
        time.sleep(1.0)
    finally:
        post(served.url, key, proto.CONTINUE_GENERATION, proto.continue_generation_body())
        worker.join(180)
    client.close()
    assert not worker.is_alive()
    assert all(len(s.response_ids) == 100 and s.finish_reason == "length" for s in samples), [
        (len(s.response_ids), s.finish_reason) for s in samples
    ]
    assert client.client.retries >= 1, "no request was aborted by the pause"


def test_abort_by_request_id_stops_one_sample_of_a_batch(served: sl.EngineProcess, model_dir: Path) -> None:
    """Over-sampling's abort: samples sent with request ids in one batched /generate; ``/abort_request`` of one
    id ends that sample alone with finish_reason abort (what :mod:`miles.rollout.oversample` relies on)."""
    import asyncio

    from miles.rollout.client import RolloutClient

    key = served.launch.api_key
    samples = _samples(model_dir, PROMPTS * 2)
    cfg = RolloutConfig(rollout_temperature=1.0, rollout_max_response_len=100, rollout_seed=5)

    async def go() -> None:
        async with RolloutClient([served.url], api_key=key, timeout_s=120, chunk_size=16) as client:
            stop = asyncio.Event()
            job = asyncio.create_task(
                client.generate(samples, cfg, 0, first_index=8, rid_prefix="abort-test", stop=stop, ignore_eos=True)
            )
            stop.set()
            # An abort that reaches the engine before the request is a no-op, and on an idle machine the tiny model
            # finishes the batch in well under 0.1 s: so the abort is sent every few milliseconds until it ends.
            deadline = time.monotonic() + 120
            while not job.done() and time.monotonic() < deadline:
                await client.abort(["abort-test-9"])  # the second sample: position 8 + 1
                await asyncio.wait([job], timeout=0.002)
            await asyncio.wait_for(job, 1)

    asyncio.run(go())
    reasons = [s.finish_reason for s in samples]
    assert reasons == ["length", "abort"] + ["length"] * 14, reasons
    assert len(samples[1].response_ids) < 100 and all(
        len(s.response_ids) == 100 for s in samples if s is not samples[1]
    )


def test_a_partial_sample_is_continued_token_in_token_out(served: sl.EngineProcess, model_dir: Path) -> None:
    """Partial rollouts' continuation on the real server: a sample cut after ``k`` tokens and sent again with
    ``continue_partial`` gets the prompt and its ``k`` tokens as input ids, keeps them (and their log-probs and
    version) and adds what the engine generates for that input, at most the rest of the length budget: the same
    tokens a direct greedy request for prompt + prefix returns."""
    import asyncio

    from miles.rollout.client import RolloutClient

    key, k = served.launch.api_key, 4
    cfg = _greedy()
    full = _samples(model_dir)[:2]
    for s in full:
        s.weight_version = 0

    async def go(samples: list[Sample], **kw: Any) -> None:
        async with RolloutClient([served.url], api_key=key, timeout_s=120) as client:
            await client.generate(samples, cfg, 0, **kw)

    asyncio.run(go(full, ignore_eos=True))
    assert all(len(s.response_ids) == RESPONSE_LEN for s in full)
    partial = [
        Sample(
            s.group_index,
            s.prompt_index,
            s.prompt,
            s.prompt_text,
            list(s.prompt_ids),
            response_ids=s.response_ids[:k],
            response_logprobs=s.response_logprobs[:k],
            finish_reason="abort",
            weight_version=0,
        )
        for s in full
    ]
    for s in partial:
        s.version_spans = [[0, k, 0]]
    direct = [
        Sample(s.group_index, s.prompt_index, s.prompt, s.prompt_text, s.prompt_ids + s.response_ids) for s in partial
    ]
    asyncio.run(go(direct, ignore_eos=True, max_new_tokens=RESPONSE_LEN - k))
    for s in partial:
        s.weight_version = 1  # the weights the continuation runs on (what the loop sets before a rollout)
    asyncio.run(go(partial, continue_partial=True, ignore_eos=True))
    for before, after, d in zip(full, partial, direct, strict=True):
        assert after.response_ids[:k] == before.response_ids[:k]
        assert after.response_logprobs[:k] == before.response_logprobs[:k]
        assert after.response_ids[k:] == d.response_ids and len(after.response_ids) == RESPONSE_LEN
        assert after.finish_reason == "length"
        assert after.version_spans == [[0, k, 0], [k, RESPONSE_LEN, after.weight_version]]


@pytest.mark.skipif(not sglang_available(), reason=SKIP_REASON)  # the router lives in .venv-sglang
def test_sglang_router_in_front_of_the_engine(
    served: sl.EngineProcess, model_dir: Path, tmp_path: Path, baseline: list
) -> None:
    """sglang-router forwards single-prompt /generate bodies and refuses a batch with per-prompt sampling params."""
    key = served.launch.api_key
    assert key is not None
    router = sr.SglangRouter.start(
        sr.router_launch(
            [served.url], host="127.0.0.1", port=free_port(0), api_key=key, log_dir=tmp_path, python=str(SGLANG_PYTHON)
        )
    )
    try:
        deadline = time.monotonic() + 60
        while served.url not in router.workers():  # --worker-urls are added in the background
            assert time.monotonic() < deadline, router.process.log_tail() if router.process else ""
            time.sleep(0.2)
        samples = _samples(model_dir)
        for sample, (ids, logprobs) in zip(samples, baseline, strict=True):
            body = proto.generate_body(
                input_ids=sample.prompt_ids,
                sampling=proto.sampling_params(max_new_tokens=RESPONSE_LEN, temperature=0.0, no_stop_trim=True),
            )
            out = post(router.url, key, proto.GENERATE, body)
            assert out["output_ids"] == ids
            # the prompts may come from the prefix cache here (an extend, not a full prefill): equal up to
            # the last bits
            assert [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]] == pytest.approx(logprobs, abs=1e-5)
        sampling = [proto.sampling_params(max_new_tokens=2, sampling_seed=i) for i in range(2)]
        batch = proto.generate_body(input_ids=[s.prompt_ids for s in samples[:2]], sampling=sampling)
        with pytest.raises(urllib.error.HTTPError) as err:
            post(router.url, key, proto.GENERATE, batch)
        assert err.value.code == 422
        assert "sampling_params[0]: invalid type: map" in err.value.read().decode()
    finally:
        router.close()


@pytest.mark.skipif(not sglang_available(), reason=SKIP_REASON)  # the router lives in .venv-sglang
def test_rollouts_through_the_router_survive_a_killed_engine_that_rejoins_after_a_sync(
    kind: str,
    served: sl.EngineProcess,
    standby: sl.EngineProcess,
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The driver's fleet with ``use_router``: rollouts through the real sglang-router (over ``served`` and an
    embedded standby); the standby is killed mid-rollout and its requests finish on ``served``; restarted, it
    stays out of the router until a weight sync gave it the actor's weights, then serves them."""
    from miles.rollout.fleet import EngineFleet, FleetConfig, driver_router

    key = served.launch.api_key
    assert key is not None and standby.launch.api_key == key
    monkeypatch.setenv("MILES_SGLANG_PYTHON", str(SGLANG_PYTHON))
    monkeypatch.setenv("MILES_ENGINE_API_KEY", key)
    monkeypatch.setenv("MILES_ROUTER_PORT", str(free_port(0)))
    run_dir = tmp_path / "run"

    def announce(index: int, eng: sl.EngineProcess) -> None:
        assert eng.pid is not None
        rundir.announce_engine(
            run_dir,
            rundir.Announcement(
                index=index, url=eng.url, host="127.0.0.1", port=eng.launch.port, pid=eng.pid, launch_id="test-launch"
            ),
        )

    announce(0, served)
    announce(1, standby)
    rollout = RolloutConfig(
        engine=kind,
        rollout_temperature=1.0,
        rollout_max_response_len=24,  # type: ignore[arg-type]
        rollout_seed=9,
    )
    spec = Spec(
        model=ModelConfig(dtype="float32"), rollout=rollout, sglang=SglangConfig(use_router=True)
    )  # manual: a prompt's samples, keyed by its group, go to one engine
    task = driver_task(run_dir, 2, master_port=free_port(0), weight_update_port=free_port(0))
    announced = rundir.wait_for_engines(run_dir, 2, "test-launch", deadline_s=10)
    fleet = EngineFleet(FleetConfig.from_spec(spec, task), task, announced, router=driver_router(spec, task))
    sup = sl.Supervisor(
        [standby], health_deadline_s=START_DEADLINE_S, poll_s=0.2, on_restart=lambda eng: announce(1, eng)
    )
    router = fleet.router
    assert router is not None
    try:
        sup.start()
        during = _samples(model_dir, PROMPTS * 4)
        worker = threading.Thread(target=fleet.generate, args=(during, 1, 0), daemon=True)
        worker.start()
        deadline = time.monotonic() + 60
        while router.loads().get(standby.url, 0) == 0:  # kill it with requests in flight there
            assert worker.is_alive() and time.monotonic() < deadline, "no request reached the standby"
            time.sleep(0.01)
        assert set(router.workers()) == {served.url, standby.url}
        standby.signal(signal.SIGKILL)
        worker.join(180)
        assert not worker.is_alive()
        assert all(s.response_ids and s.finish_reason in ("stop", "length") for s in during), (
            "a request of the killed engine was lost"
        )
        assert router.removed == [standby.url]

        assert sup.restarted_event.wait(START_DEADLINE_S), f"not restarted: {sup.failed}\n{standby.log_tail()}"
        stale = _samples(model_dir)
        fleet.generate(stale, rollout_id=2, weight_version=0)  # it is back, but with the checkpoint's weights
        assert set(router.workers()) == {served.url}
        assert all(s.response_ids for s in stale)

        fleet.sync(list(sharpened(hf_weights(model_dir)).items()), version=7)
        after = _samples(model_dir)
        fleet.generate(after, rollout_id=3, weight_version=7)
        assert set(router.workers()) == {served.url, standby.url}
        assert all(s.weight_version == 7 for s in after), [s.weight_version for s in after]
        assert model_info(standby.url, key)["weight_version"] == "7"  # the restarted engine got the pushed weights
    finally:
        sup.stop()
        fleet.close()
    assert router.process is not None and not router.process.alive()


@pytest.mark.skipif(not sglang_available(), reason=SKIP_REASON)  # the router lives in .venv-sglang
def test_a_conversations_turns_stay_on_its_engine_behind_the_router(
    kind: str, served: sl.EngineProcess, standby: sl.EngineProcess, model_dir: Path, tmp_path: Path
) -> None:
    """Session affinity through the real sglang-router as the driver starts it (``manual`` policy): conversations
    of three turns from a generate function, each turn sent with the conversation's session as routing key, over
    ``served`` and an embedded standby. Every engine stamps its answers with its own weight version, so the answers
    say which engine generated each turn: all turns of a conversation on one engine, the conversations on both;
    SGLang answers its later turns from the prefix cache."""
    key = served.launch.api_key
    assert key is not None and standby.launch.api_key == key
    stamps = {served.url: 1001, standby.url: 1002}
    before = model_info(served.url, key)["weight_version"]
    for url, stamp in stamps.items():
        post(url, key, proto.UPDATE_WEIGHT_VERSION, proto.update_weight_version_body(new_version=str(stamp)))
        post(url, key, proto.FLUSH_CACHE)
    spec = Spec(sglang=SglangConfig(use_router=True))
    launch = sr.driver_router_launch(spec, free_port(0), key, tmp_path, str(SGLANG_PYTHON))
    assert "manual" in launch.argv
    router = sr.SglangRouter.start(launch)
    tok = _tokenizer(model_dir)
    glue = tok("=1+", add_special_tokens=False)["input_ids"]
    turns: dict[int, list[tuple[int | None, int, int]]] = {}
    """Conversation -> each turn's (engine stamp, cached tokens, input length)."""

    async def three_turns(input: GenerateFnInput) -> GenerateFnOutput:
        s, params = input.sample, {**input.sampling_params, "max_new_tokens": 3}
        ids: list[int] = []
        for turn in range(3):
            out = await input.state.client.generate_turn(s.prompt_ids + ids, params, session=input.session)
            turns.setdefault(s.prompt_index, []).append(
                (out.weight_version, out.cached_tokens, len(s.prompt_ids) + len(ids))
            )
            ids += out.output_ids + (glue if turn < 2 else [])
        s.response_ids, s.response_logprobs, s.turns = ids, [0.0] * len(ids), 3
        return GenerateFnOutput(samples=s)

    cfg = RolloutConfig(rollout_temperature=1.0, rollout_max_response_len=16, rollout_seed=3)
    client = BlockingRolloutClient([router.url], api_key=key, batched=False, timeout_s=120)
    try:
        assert sorted(router.route_to(list(stamps))) == sorted(stamps)
        state = GenerateState(client.client, tok, cfg, rollout_id=4, weight_version=0)
        client.run(lambda _client: generate_samples(three_turns, "three_turns", _samples(model_dir), state))
    finally:
        client.close()
        router.close()
        post(served.url, key, proto.UPDATE_WEIGHT_VERSION, proto.update_weight_version_body(new_version=before))
    assert len(turns) == len(PROMPTS) and all(len(t) == 3 for t in turns.values())
    engine_of = {c: {stamp for stamp, _, _ in t} for c, t in turns.items()}
    assert all(len(e) == 1 for e in engine_of.values()), engine_of  # every turn on its conversation's engine
    assert set().union(*engine_of.values()) == set(stamps.values()), engine_of  # conversations on both engines
    if kind == "sglang":  # its radix cache held each conversation's earlier turns when the next came
        on_sglang = [t for t in turns.values() if t[0][0] == stamps[served.url]]
        later = [(t[k][1], t[k - 1][2]) for t in on_sglang for k in (1, 2)]  # (cached, the turn before's input)
        assert later and all(cached >= before_len for cached, before_len in later), on_sglang


@pytest.fixture()
def standby(model_dir: Path, tmp_path: Path) -> Iterator[sl.EngineProcess]:
    """A second engine (embedded) that takes over the requests of a killed one."""
    eng = launch("embedded", 1, model_dir, tmp_path, api_key="test-key-0")
    eng.start()
    try:
        eng.wait_healthy(START_DEADLINE_S)
        yield eng
    finally:
        eng.stop()


def test_killed_engine_requests_finish_elsewhere_and_it_rejoins(
    served: sl.EngineProcess, standby: sl.EngineProcess, model_dir: Path
) -> None:
    key = served.launch.api_key
    urls = [served.url, standby.url]
    new = sharpened(hf_weights(model_dir))
    sync = WeightSync(urls, "127.0.0.1", free_port(0), api_key=key, group_name="miles-test-kill", timeout_s=120)
    sync.sync(list(new.items()), weight_version=5)
    before = _samples(model_dir)
    _generate([served.url], key, before, _greedy())

    sup = sl.Supervisor([served], health_deadline_s=START_DEADLINE_S, poll_s=0.2)
    sup.start()
    try:
        samples = _samples(model_dir, PROMPTS * 2)
        cfg = RolloutConfig(rollout_temperature=1.0, rollout_max_response_len=60, rollout_seed=9)
        result: dict[str, Any] = {}

        def run() -> None:
            client = BlockingRolloutClient(
                urls, api_key=key, timeout_s=120, chunk_size=1, backoff_s=0.2, dead_cooldown_s=600
            )
            try:
                client.generate(samples, cfg, 0, ignore_eos=True)
                result["retries"] = client.client.retries
            except BaseException as e:
                result["error"] = e
            finally:
                client.close()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        # Kill it while its first requests are in flight (or not yet accepted: either way
        # they fail and must be resent); later, on a fast machine, it may have finished them.
        time.sleep(0.1)
        served.signal(signal.SIGKILL)
        worker.join(300)
        assert "error" not in result, result.get("error")
        assert all(len(s.response_ids) == 60 for s in samples), "a request of the killed engine was lost"
        assert result["retries"] >= 1, "no request was resent after the kill"

        assert sup.restarted_event.wait(START_DEADLINE_S + 30), f"not restarted: {sup.failed}\n{served.log_tail()}"
        assert sup.take_restarted() == [0] and served.starts == 2
        # The restarted engine has the checkpoint's weights: re-form the group and push the current ones.
        sync.close()
        sync = WeightSync(urls, "127.0.0.1", free_port(0), api_key=key, group_name="miles-test-rejoin", timeout_s=120)
        sync.sync(list(new.items()), weight_version=6)
        after = _samples(model_dir)
        _generate([served.url], key, after, _greedy())
        assert [s.response_ids for s in after] == [s.response_ids for s in before]
        assert all(s.weight_version == 6 for s in after)
    finally:
        sup.stop()
        sync.close()
