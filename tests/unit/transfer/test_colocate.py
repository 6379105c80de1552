"""Colocated weight sync: this process (the trainer) hands shared-memory CPU tensors to a real engine server process."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from miles.engine.local import LocalEngine
from miles.sglang import protocol as proto
from miles.transfer.bucket import Bucket
from miles.transfer.checksum import tensor_checksum
from miles.transfer.colocate import TensorSync, bucket_metadata, deserialize_bucket, reconstruct, serialize_bucket
from miles.transfer.sync import SyncError
from tests.unit.transfer.test_sync import checksums, greedy, trainer_weights


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[LocalEngine]:
    with LocalEngine(tiny_model_dir) as proc:
        yield proc


def post_raw(url: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serialized_bucket_round_trips_with_sglang_names() -> None:
    named = [("a", torch.randn(3, 4)), ("b", torch.randn(5).to(torch.bfloat16)), ("c", torch.arange(3))]
    bucket = Bucket()
    for n, t in named:
        bucket.add(n, t)
    entry = serialize_bucket(bucket.flatten(), bucket_metadata(bucket))
    raw = base64.b64decode(entry)
    assert b"sglang.srt.weight_sync.tensor_bucket" in raw and b"FlattenedTensorMetadata" in raw
    assert b"rebuild_storage_filename" in raw  # shared memory by name, reachable from an unrelated process
    flat, meta = deserialize_bucket(entry)
    assert [m.name for m in meta] == ["a", "b", "c"] and meta[1].dtype == torch.bfloat16
    for (n, t), (n2, t2) in zip(named, reconstruct(flat, meta), strict=True):
        assert n == n2 and t.dtype == t2.dtype and torch.equal(t, t2)


def test_weights_land_bit_exactly_and_old_weights_restore_the_output(engine: LocalEngine, tiny_model_dir: Path) -> None:
    original = trainer_weights(tiny_model_dir)
    base, _ = greedy(engine.url)
    g = torch.Generator().manual_seed(3)
    noisy = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in original.items()}
    sync = TensorSync([engine.url], bucket_bytes=4096, timeout_s=120)
    try:
        stats = sync.sync(noisy.items(), weight_version=7)
        assert stats.tensors == len(noisy) and stats.buckets > 5 and stats.weight_version == "7"
        got = checksums(engine.url)
        assert {k: got[k] for k in noisy} == {k: tensor_checksum(v) for k, v in noisy.items()}
        ids, version = greedy(engine.url)
        assert version == "7" and ids != base
        sync.sync(original.items(), weight_version=8)
        assert greedy(engine.url) == (base, "8")
    finally:
        sync.close()


def _entry(named: list[tuple[str, torch.Tensor]]) -> tuple[str, torch.Tensor]:
    bucket = Bucket()
    for n, t in named:
        bucket.add(n, t)
    flat = bucket.flatten()
    return serialize_bucket(flat, bucket_metadata(bucket)), flat


def _refused(url: str, entries: list[str], **kw: Any) -> str:
    before = checksums(url)
    status, answer = post_raw(
        url,
        proto.UPDATE_WEIGHTS_FROM_TENSOR.path,
        proto.update_weights_from_tensor_body(
            serialized_named_tensors=entries,
            load_format=kw.pop("load_format", proto.FLATTENED_BUCKET),
            weight_version="refused",
            **kw,
        ),
    )
    assert status == 400 and answer["success"] is False, answer
    assert checksums(url) == before, "a refused bucket changed the engine's weights"
    return str(answer["message"])


def test_wrong_names_shapes_and_formats_are_refused_whole(engine: LocalEngine, tiny_model_dir: Path) -> None:
    w = trainer_weights(tiny_model_dir)
    good = ("model.norm.weight", w["model.norm.weight"] + 1.0)  # valid: must not land when its bucket is refused
    entry, _flat = _entry([good, ("model.no_such.weight", torch.zeros(3))])
    assert "'model.no_such.weight' is not a parameter" in _refused(engine.url, [entry])
    entry, _flat = _entry([good, ("lm_head.weight", torch.zeros(2, 2))])
    assert "shape (2, 2)" in _refused(engine.url, [entry])
    entry, _flat = _entry([("model.norm.weight", torch.zeros(w["model.norm.weight"].shape, dtype=torch.int32))])
    assert "dtype torch.int32" in _refused(engine.url, [entry])
    # An entry is good for one opening (it holds one reference on the sender's memory): serialize afresh.
    bucket = Bucket()
    bucket.add(*good)
    flat = bucket.flatten()
    entries = [serialize_bucket(flat, bucket_metadata(bucket)) for _ in range(2)]
    assert "1 TP rank" in _refused(engine.url, entries)
    entry, _flat = _entry([good])
    assert "not supported" in _refused(engine.url, [entry], load_format="direct")
    _, version = greedy(engine.url)
    assert version != "refused"


class _Foreign:
    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (os.getpid, ())


def test_unpickling_a_foreign_global_is_refused(engine: LocalEngine) -> None:
    buf = io.BytesIO()
    pickle.Pickler(buf).dump({"flattened_tensor": _Foreign(), "metadata": []})
    message = _refused(engine.url, [base64.b64encode(buf.getvalue()).decode()])
    assert "refusing to load posix.getpid" in message
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        deserialize_bucket(base64.b64encode(buf.getvalue()).decode())


def test_an_engine_error_stops_the_sync_and_generation_continues(engine: LocalEngine) -> None:
    sync = TensorSync([engine.url], bucket_bytes=1 << 20, timeout_s=60)
    try:
        with pytest.raises(SyncError, match="is not a parameter"):
            sync.sync([("model.no_such.weight", torch.zeros(4))], weight_version=99)
    finally:
        sync.close()
    ids, version = greedy(engine.url)  # continued after the failed sync
    assert ids and version != "99"


def test_wire_form_is_sglangs_own() -> None:
    """Against the pinned wheel: the metadata class path and fields, the payload keys, the unpickler's allowance."""
    import ast
    import dataclasses

    from miles.transfer.colocate import SGLANG_METADATA, FlattenedTensorMetadata
    from tests.sglang_wheel import pinned_source

    sgl = pinned_source()
    module, name = SGLANG_METADATA
    tree = sgl.tree(module.replace(".", "/") + ".py")
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    theirs = [s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
    assert theirs == [f.name for f in dataclasses.fields(FlattenedTensorMetadata)]
    updater = sgl.text("sglang/srt/model_executor/model_runner_components/weight_updater.py")
    assert 'flattened_tensor_bucket_dict["flattened_tensor"]' in updater
    assert 'flattened_tensor_bucket_dict["metadata"]' in updater
    common = sgl.text("sglang/srt/utils/common.py")
    assert "ForkingPickler(buf).dump(obj)" in common and "pybase64.b64decode(data, validate=True)" in common
    # SGLang's SafeUnpickler must let through every module this sender names.
    allowed = ast.literal_eval(
        next(
            n.value
            for n in ast.walk(sgl.tree("sglang/srt/utils/common.py"))
            if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "ALLOWED_MODULE_PREFIXES" for t in n.targets)
        )
    )
    for mod in (module, "torch.multiprocessing.reductions", "torch.storage", "torch"):
        assert any((mod + ".").startswith(p) for p in allowed), mod
    tp_worker = sgl.text("sglang/srt/managers/tp_worker.py")
    assert "serialized_named_tensors[self.ps.tp_rank]" in tp_worker  # one entry per TP rank, each its own


def _trainer_rank(rank: int, port: int, url: str, shape: list[int], bad: bool, out: str) -> None:
    """One of two trainer ranks (gloo): rank 0 runs TensorSync, rank 1 TensorSyncPeer, on identical tensors."""
    import faulthandler

    import torch.distributed as dist

    from miles.transfer.colocate import TensorSyncPeer

    faulthandler.dump_traceback_later(90, exit=True)  # a rank stuck in a collective tells where
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    named = [("model.norm.weight", torch.full(shape, 2.0)), ("model.norm.weight", torch.full(shape, 3.0))]
    if bad:
        named.append(("model.no_such.weight", torch.zeros(4)))
    nbytes = named[0][1].numel() * 4  # one tensor per bucket
    try:
        if rank == 0:
            sync = TensorSync([url], bucket_bytes=nbytes, group=dist.group.WORLD, timeout_s=60)
            sync.sync(iter(named), weight_version="multi")
            sync.close()
        else:
            TensorSyncPeer(nbytes, "cpu", dist.group.WORLD).sync(iter(named))
        outcome = "ok"
    except SyncError as e:
        outcome = f"SyncError: {e}"
    Path(out, f"rank{rank}").write_text(outcome)
    dist.destroy_process_group()


@pytest.mark.parametrize("bad", [False, True], ids=["ok", "engine-refuses"])
def test_two_trainer_ranks_stay_in_step(engine: LocalEngine, tiny_model_dir: Path, tmp_path: Path, bad: bool) -> None:
    import subprocess
    import sys

    from miles.job.ports import free_port

    shape = list(trainer_weights(tiny_model_dir)["model.norm.weight"].shape)
    port = free_port()
    code = (
        "import sys; from tests.unit.transfer.test_colocate import _trainer_rank; "
        "_trainer_rank(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], [int(sys.argv[4])], sys.argv[5] == '1', "
        "sys.argv[6])"
    )
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-X",
                "faulthandler",
                "-c",
                code,
                str(r),
                str(port),
                engine.url,
                str(shape[0]),
                "1" if bad else "0",
                str(tmp_path),
            ],
            cwd=root,
            env=env,
            stdout=logs[r].open("w"),
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    try:
        for proc in procs:
            proc.wait(timeout=120)
    finally:
        for proc in procs:
            proc.kill()
    assert all(proc.returncode == 0 for proc in procs), [log.read_text()[-3000:] for log in logs]
    outcomes = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    got = post_raw(engine.url, "/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": 1 << 20})[1]
    assert torch.equal(torch.tensor(got), torch.full(shape, 3.0))  # every bucket before the refused one landed
    if bad:  # both ranks stop with the engine's message; neither waits forever
        assert all("'model.no_such.weight' is not a parameter" in o for o in outcomes), outcomes
    else:
        assert outcomes == ["ok", "ok"]
        assert greedy(engine.url)[1] == "multi"
    assert post_raw(engine.url, "/update_weights_from_disk", {"model_path": str(tiny_model_dir)})[0] == 200
