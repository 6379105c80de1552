"""``miles bench sync`` on CPU: a real engine process, real gloo broadcasts, a real PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from miles.bench import main
from miles.errors import UserError

from .conftest import load_report, positive_finite


def test_sync_sweeps_bucket_sizes_against_raw_broadcast(tiny_config: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "sync.json", tmp_path / "sync.png"
    assert (
        main(
            "sync",
            [
                "--config",
                str(tiny_config),
                "--dtype",
                "float32",
                "--total-gb",
                "0.002",
                "--bucket-mb",
                "0.25",
                "1",
                "--iters",
                "1",
                "--json",
                str(out),
                "--plot",
                str(png),
            ],
        )
        == 0
    )
    report = load_report(out, "sync")
    assert report["settings"]["backend"] == "gloo" and report["settings"]["engines"] == 1
    assert [r["bucket_mb"] for r in report["rows"]] == [0.25, 1.0]
    for row in report["rows"]:
        for key in ("seconds", "sync_gb_s", "raw_seconds", "raw_gb_s", "ratio"):
            assert positive_finite(row[key]), (key, row)
        assert row["buckets"] >= 1
    assert report["rows"][0]["buckets"] > report["rows"][1]["buckets"]  # smaller buckets, more of them
    s = report["summary"]
    assert abs(s["weights_gib"] - 0.002) < 0.001  # layers were repeated to reach --total-gb
    assert report["settings"]["layers"] > 2
    assert s["best_ratio"] == max(r["ratio"] for r in report["rows"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sync_refuses_nccl_on_cpu(tiny_config: Path) -> None:
    with pytest.raises(UserError, match="nccl"):
        main("sync", ["--config", str(tiny_config), "--device", "cpu", "--backend", "nccl"])


@pytest.mark.slow
def test_sync_inside_a_slurm_step(tiny_config: Path, tmp_path: Path) -> None:
    """Two tasks as srun starts them (SLURM_PROCID 0 sends, 1 serves), meeting in a shared directory."""
    rdv, out = tmp_path / "rdv", tmp_path / "sync.json"
    rdv.mkdir()
    from miles.job.ports import free_port

    (rdv / "engine-1.url").write_text(f"http://127.0.0.1:{free_port()}\n")  # left by an earlier run: dead
    (rdv / "done").write_text("done\n")
    args = [
        "--config",
        str(tiny_config),
        "--dtype",
        "float32",
        "--bucket-mb",
        "1",
        "--iters",
        "1",
        "--slurm",
        "--rendezvous",
        str(rdv),
        "--master-addr",
        "127.0.0.1",
        "--json",
        str(out),
        "--timeout",
        "300",
    ]
    procs = []
    for procid in (1, 0):
        env = dict(
            os.environ,
            SLURM_PROCID=str(procid),
            SLURM_NTASKS="2",
            SLURM_LOCALID=str(procid),
            SLURM_JOB_ID="4242",
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "miles.cli", "bench", "sync", *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = [p.communicate(timeout=400)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    report = json.loads(out.read_text())
    assert report["settings"]["engines"] == 1 and positive_finite(report["rows"][0]["ratio"])
    assert (rdv / "done").exists() and (rdv / "engine-1.url").read_text().startswith("http://")


@pytest.mark.slow
def test_sync_under_torchrun(tiny_config: Path, tmp_path: Path) -> None:
    """torchrun starts both ranks (RANK 0 sends, RANK 1 serves an engine); they meet in a directory of this host."""
    out = tmp_path / "sync.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "miles.cli",
            "bench",
            "sync",
            "--torchrun",
            "--config",
            str(tiny_config),
            "--dtype",
            "float32",
            "--bucket-mb",
            "0.25",
            "1",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--json",
            str(out),
            "--timeout",
            "300",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout.decode(errors="replace")[-3000:]
    report = json.loads(out.read_text())
    assert report["settings"]["engines"] == 1 and [r["bucket_mb"] for r in report["rows"]] == [0.25, 1.0]
    assert all(positive_finite(r["ratio"]) and positive_finite(r["median_s"]) for r in report["rows"])
    assert list(tmp_path.glob("miles-bench-sync-*/engine-1.url"))  # the rendezvous was under $TMPDIR


def test_sync_refuses_two_launchers_and_one_task(tiny_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="not both"):
        main("sync", ["--config", str(tiny_config), "--slurm", "--torchrun"])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UserError, match="at least 2 tasks"):
        main("sync", ["--config", str(tiny_config), "--torchrun"])
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(UserError, match="torchrun --nproc-per-node"):
        main("sync", ["--config", str(tiny_config), "--torchrun"])
