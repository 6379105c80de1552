"""Weight sync over gloo from this process (trainer rank 0) to real engine server processes."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from miles.engine.local import LocalEngine
from miles.job.ports import free_port
from miles.sglang import protocol as proto
from miles.transfer.checksum import tensor_checksum
from miles.transfer.sync import SyncError, WeightSync, bench

PROMPT = [4, 5, 13, 6]


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Path) -> Iterator[list[LocalEngine]]:
    procs = LocalEngine.start_many(tiny_model_dir, 2)
    yield procs
    for p in procs:
        p.stop()


def post(url: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(
        url + path, data=json.dumps(body or {}).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def greedy(url: str) -> tuple[list[int], str]:
    out = post(
        url,
        "/generate",
        proto.generate_body(
            input_ids=PROMPT, sampling=proto.sampling_params(max_new_tokens=10, temperature=0.0, ignore_eos=True)
        ),
    )
    return out["output_ids"], out["meta_info"]["weight_version"]


def checksums(url: str) -> dict[str, str]:
    return post(url, "/weights_checker", {"action": "checksum"})["ranks"][0]["checksums"]


def trainer_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize("bucket_bytes", [1024, 1 << 30], ids=["small-buckets", "one-bucket"])
def test_engine_weights_equal_the_trainers_bit_for_bit(
    engines: list[LocalEngine], tiny_model_dir: Path, bucket_bytes: int
) -> None:
    urls = [e.url for e in engines]
    original = trainer_weights(tiny_model_dir)
    base = [greedy(u)[0] for u in urls]
    g = torch.Generator().manual_seed(bucket_bytes % 97)
    noisy = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in original.items()}
    sync = WeightSync(
        urls,
        "127.0.0.1",
        free_port(),
        backend="gloo",
        bucket_bytes=bucket_bytes,
        group_name=f"sync_test_{bucket_bytes}",
        timeout_s=120,
    )
    try:
        stats = sync.sync(noisy.items(), weight_version=1)
        assert stats.bytes == sum(t.numel() * t.element_size() for t in noisy.values())
        assert stats.tensors == len(noisy) and stats.weight_version == "1"
        assert (
            stats.buckets == (1 if bucket_bytes > stats.bytes else pytest.approx(stats.buckets)) and stats.buckets >= 1
        )
        if bucket_bytes == 1024:
            assert stats.buckets > 10
        want = {k: tensor_checksum(v) for k, v in noisy.items()}
        for u in urls:
            got = checksums(u)
            assert {k: got[k] for k in want} == want
            rows = post(
                u, "/get_weights_by_name", {"name": "model.layers.0.mlp.down_proj.weight", "truncate_size": 10**6}
            )
            assert torch.equal(torch.tensor(rows), noisy["model.layers.0.mlp.down_proj.weight"])
            ids, version = greedy(u)
            assert version == "1"
        changed = [greedy(u)[0] for u in urls]
        assert changed != base  # greedy output follows the new weights

        stats = sync.sync(original.items(), weight_version=2)
        assert [greedy(u) for u in urls] == [(b, "2") for b in base]  # old weights back: output restored exactly
        for u in urls:
            assert {k: checksums(u)[k] for k in original} == {k: tensor_checksum(v) for k, v in original.items()}
    finally:
        sync.close()


def test_bench_compares_with_a_raw_broadcast(engines: list[LocalEngine], tiny_model_dir: Path) -> None:
    sync = WeightSync(
        [e.url for e in engines],
        "127.0.0.1",
        free_port(),
        bucket_bytes=1 << 20,
        group_name="sync_bench_test",
        timeout_s=120,
    )
    try:
        result = bench(sync, list(trainer_weights(tiny_model_dir).items()), iters=2)
    finally:
        sync.close()
    assert result["bytes"] > 0 and result["seconds"] > 0 and result["raw_seconds"] > 0
    assert 0 < result["ratio"] <= 1.5
    assert result["gb_per_s"] == pytest.approx(result["bytes"] / result["seconds"] / 1e9)


def test_views_of_one_flat_buffer_go_without_a_copy_and_buffers_are_reused(
    engines: list[LocalEngine], tiny_model_dir: Path
) -> None:
    """Weights that are slices of one flat buffer (as in trainers that keep a contiguous parameter buffer)
    are sent in place; the flattening buffers of a CPU sync outlive it. Either way the engine gets the bits."""
    original = trainer_weights(tiny_model_dir)
    flat = torch.cat([v.reshape(-1) * 1.5 for v in original.values()])
    sliced, offset = {}, 0
    for k, v in original.items():
        sliced[k] = flat[offset : offset + v.numel()].view(v.shape)
        offset += v.numel()
    url = engines[0].url
    sync = WeightSync([url], "127.0.0.1", free_port(), bucket_bytes=4096, group_name="sync_flat_test", timeout_s=120)
    try:
        sync.sync(sliced.items(), weight_version=3)
        assert {k: checksums(url)[k] for k in sliced} == {k: tensor_checksum(v) for k, v in sliced.items()}
        staging = sync._staging
        assert staging is not None and all(b is None for b in staging.buffers)  # nothing was copied
        copies = {k: v.clone() * 2 for k, v in original.items()}
        sync.sync(copies.items(), weight_version=4)
        buffers = [b.data_ptr() for b in staging.buffers if b is not None]
        assert buffers and sync._staging is staging
        sync.sync(copies.items(), weight_version=5)
        assert [b.data_ptr() for b in staging.buffers if b is not None] == buffers  # the same two buffers
        assert {k: checksums(url)[k] for k in copies} == {k: tensor_checksum(v) for k, v in copies.items()}
    finally:
        sync.close()
        sync = WeightSync([url], "127.0.0.1", free_port(), group_name="sync_flat_restore", timeout_s=120)
        sync.sync(original.items(), weight_version=6)
        sync.close()


def test_slow_buckets_reopen_the_pipelined_connections(
    engines: list[LocalEngine], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bucket that took longer than IDLE_SAFE_S to produce goes on a new connection (the server may be
    closing the idle one); at 0 s every bucket does, and the engine still gets every bit in order."""
    import miles.transfer.sync as sync_module

    monkeypatch.setattr(sync_module, "IDLE_SAFE_S", 0.0)
    weights = {k: v * 0.5 for k, v in trainer_weights(tiny_model_dir).items()}
    url = engines[1].url
    sync = WeightSync([url], "127.0.0.1", free_port(), bucket_bytes=8192, group_name="sync_idle_test", timeout_s=120)
    try:
        assert sync.sync(weights.items(), weight_version=7).buckets > 5
        assert {k: checksums(url)[k] for k in weights} == {k: tensor_checksum(v) for k, v in weights.items()}
        sync.sync(trainer_weights(tiny_model_dir).items(), weight_version=8)
    finally:
        sync.close()


def test_pause_and_continue_ride_the_pipelined_connection(
    engines: list[LocalEngine], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync that succeeds makes no HTTP call besides its pipelined connection (pause, buckets, continue);
    one that fails continues every engine on a fresh connection, so none stays paused."""
    sent: list[str] = []
    real_post = WeightSync._post

    def recording_post(self: WeightSync, url: str, path: str, body: Any) -> Any:
        sent.append(path)
        return real_post(self, url, path, body)

    monkeypatch.setattr(WeightSync, "_post", recording_post)
    urls = [e.url for e in engines]
    weights = {k: v * 0.25 for k, v in trainer_weights(tiny_model_dir).items()}
    sync = WeightSync(
        urls, "127.0.0.1", free_port(), bucket_bytes=16384, group_name="sync_pipeline_test", timeout_s=120
    )
    try:
        sync.connect()
        sent.clear()
        assert sync.sync(weights.items(), weight_version=11).buckets > 1
        assert sent == []
        for u in urls:
            assert {k: checksums(u)[k] for k in weights} == {k: tensor_checksum(v) for k, v in weights.items()}
            assert greedy(u)[1] == "11"  # continued: it generates
        with pytest.raises(SyncError, match="shape"):
            sync.sync({"model.norm.weight": torch.zeros(3)}.items())
        assert sent == [proto.CONTINUE_GENERATION.path] * len(urls)
        assert all(greedy(u)[0] for u in urls)
        sync.sync(trainer_weights(tiny_model_dir).items(), weight_version=12)
    finally:
        sync.close()


def test_sync_errors_name_the_engine(tiny_model_dir: Path, engines: list[LocalEngine]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    sync = WeightSync([dead], "127.0.0.1", free_port(), group_name="sync_dead_test", timeout_s=3)
    t0 = time.monotonic()
    with pytest.raises(SyncError, match="could not form weight-update group"):
        sync.connect()
    assert time.monotonic() - t0 < 30

    sync = WeightSync([engines[0].url], "127.0.0.1", free_port(), group_name="sync_shape_test", timeout_s=60)
    try:
        bad = {"model.norm.weight": torch.zeros(3)}
        with pytest.raises(SyncError, match=engines[0].url + ".*shape"):
            sync.sync(bad.items())
        assert greedy(engines[0].url)[0]  # the engine still serves after a refused update
    finally:
        sync.close()


def _trainer_rank(rank: int, url: str, master_port: int, group_port: int, model_dir: str) -> None:
    """One rank of a 2-rank gloo trainer job; rank 0 syncs while the job's own group keeps working."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{master_port}", rank=rank, world_size=2)
    weights = {k: v * 1.01 for k, v in trainer_weights(Path(model_dir)).items()}
    if rank == 0:
        sync = WeightSync([url], "127.0.0.1", group_port, group_name="sync_in_job_test", timeout_s=120)
        sync.sync(weights.items(), weight_version=9)
        got = checksums(url)
        assert all(got[k] == tensor_checksum(v) for k, v in weights.items())
        sync.close()
    total = torch.ones(1) * (rank + 1)
    dist.all_reduce(total)
    assert total.item() == 3.0
    dist.destroy_process_group()


def test_trainer_rank_zero_of_a_job_syncs_beside_the_jobs_own_group(
    engines: list[LocalEngine], tiny_model_dir: Path
) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_trainer_rank, args=(engines[1].url, free_port(), free_port(), str(tiny_model_dir)), nprocs=2)
    assert greedy(engines[1].url)[1] == "9"
