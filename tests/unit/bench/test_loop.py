"""``miles bench loop``: phases and overhead from the loop's own perf.jsonl."""

from __future__ import annotations

from pathlib import Path

import pytest

from miles.bench import main
from miles.errors import UserError
from miles.session.metrics import MetricsLog

from .conftest import load_report, positive_finite

ROOT = Path(__file__).resolve().parents[3]


def test_loop_reads_phases_and_overhead_of_a_run_dir(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, 0, tensorboard=False, plot=False)  # what the loop's driver writes
    for i, (gen, train, total) in enumerate([(5.0, 2.0, 10.0), (1.0, 2.0, 4.0), (1.0, 1.5, 3.5)]):
        log.log(
            i,
            {"rollout/reward_mean": 0.5},
            {
                "time/generate": gen,
                "time/reward": 0.25,
                "time/train": train,
                "time/sync": 0.5,
                "time/total": total,
                "rollout/tokens_per_s": 100.0,
            },
        )
    out = tmp_path / "loop.json"
    assert main("loop", ["--from-run", str(tmp_path), "--json", str(out)]) == 0
    report = load_report(out, "loop")
    rows = report["rows"]
    assert [r["rollout"] for r in rows] == [0, 1, 2]
    assert rows[1]["overhead"] == pytest.approx(4.0 - (1.0 + 0.25 + 2.0 + 0.5))
    s = report["summary"]
    assert s["rollouts_counted"] == 2  # the first rollout is left out of the means
    assert s["overhead_share"] == pytest.approx((0.25 + 0.25) / 7.5)
    assert s["mean_generate_s"] == pytest.approx(1.0) and s["share_train"] == pytest.approx(3.5 / 7.5)
    assert s["meets_target"] is False  # 6.7% > 3%


def test_loop_without_perf_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="perf.jsonl"):
        main("loop", ["--from-run", str(tmp_path)])


@pytest.mark.slow
def test_loop_runs_the_quickstart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    out = tmp_path / "loop.json"
    assert (
        main(
            "loop",
            [
                "configs/quickstart.toml",
                "--rollouts",
                "2",
                "--run-dir",
                str(tmp_path / "run"),
                "--set",
                "run.plot=false",
                "--json",
                str(out),
            ],
        )
        == 0
    )
    report = load_report(out, "loop")
    assert len(report["rows"]) == 2
    for row in report["rows"]:
        for phase in ("generate", "reward", "train", "sync", "total"):
            assert positive_finite(row[phase]), (phase, row)
        assert row["overhead"] > -1e-6 and row["overhead_share"] < 1
    summary = report["summary"]
    assert positive_finite(summary["process_wall_s"])
    # the first rollout ends after the process started and before it ended, and after its own total
    assert report["rows"][0]["total"] < summary["time_to_first_rollout_s"] < summary["process_wall_s"]
    assert (tmp_path / "run" / "perf.jsonl").exists()


def test_compare_async_reports_speed_and_reward_of_each_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import miles.bench.loop as loop

    async_spec = tmp_path / "async.toml"
    async_spec.write_text("")
    ran: list[tuple[str, list[str]]] = []
    curves = {"sync": [0.1, 0.5, 0.8, 0.9, 0.85, 0.8, 0.9], "async": [0.1, 0.4, 0.9, 0.7, 0.75, 0.8, 0.6]}

    def fake_run(a: object, run_dir: Path) -> float:  # what `miles run` leaves in the run dir
        ran.append((a.spec, list(a.overrides)))  # type: ignore[attr-defined]
        run_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(run_dir, 0, tensorboard=False, plot=False)
        seconds = 2.0 if run_dir.name == "sync" else 1.0
        for i, reward in enumerate(curves[run_dir.name]):
            log.log(i, {"rollout/reward_mean": reward, "rollout/samples": 8}, {"time/total": seconds})
        return 0.0

    monkeypatch.setattr(loop, "run_spec", fake_run)
    out = tmp_path / "loop.json"
    argv = ["configs/quickstart.toml", "--compare-async", "--async-spec", str(async_spec), "--run-dir"]
    monkeypatch.chdir(ROOT)
    assert main("loop", [*argv, str(tmp_path / "runs"), "--set", "run.seed=7", "--json", str(out)]) == 0
    # sync: the spec as it is; async: --async-spec with train_async on; the user's overrides go to both
    assert ran == [
        ("configs/quickstart.toml", ["run.seed=7", "run.train_async=false"]),
        (str(async_spec), ["run.seed=7", "run.train_async=true"]),
    ]
    report = load_report(out, "loop")
    s = report["summary"]
    assert s["sync_samples_per_s"] == pytest.approx(4.0) and s["async_samples_per_s"] == pytest.approx(8.0)
    assert s["async_speedup"] == pytest.approx(2.0)
    assert s["sync_reward_final"] == pytest.approx(0.9) and s["async_reward_final"] == pytest.approx(0.6)
    assert s["sync_reward_last5_mean"] == pytest.approx((0.8 + 0.9 + 0.85 + 0.8 + 0.9) / 5)
    assert s["async_reward_last5_mean"] == pytest.approx((0.9 + 0.7 + 0.75 + 0.8 + 0.6) / 5)
    assert s["async_reward_max"] == pytest.approx(0.9)
    assert [r["run"] for r in report["rows"]] == ["sync", "async"]
    assert report["rows"][1]["spec"] == str(async_spec) and report["rows"][1]["reward_final"] == pytest.approx(0.6)


def test_async_spec_without_compare_async_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--compare-async"):
        main("loop", ["--from-run", str(tmp_path), "--async-spec", "configs/quickstart.toml"])


def test_a_failed_run_keeps_its_directory_for_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import miles.bench.loop as loop

    monkeypatch.setattr(loop.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "tmp"))
    monkeypatch.chdir(ROOT)
    # a key no table has: `miles run` refuses the spec with exit 2 before anything starts
    with pytest.raises(RuntimeError, match="exited with 2"):
        main("loop", ["configs/quickstart.toml", "--rollouts", "1", "--set", "run.no_such_key=1"])
    assert (tmp_path / "tmp" / "run" / "bench-loop.log").read_text().count("no_such_key") >= 1
    assert f"kept the failed run's directory for its logs: {tmp_path / 'tmp'}" in capsys.readouterr().err
