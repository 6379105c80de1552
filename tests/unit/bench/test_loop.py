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
    assert positive_finite(report["summary"]["process_wall_s"])
    assert (tmp_path / "run" / "perf.jsonl").exists()
