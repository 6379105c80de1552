"""metrics.jsonl / perf.jsonl writing, truncation on resume, and the plot."""

from __future__ import annotations

import json
from pathlib import Path

from miles.session.metrics import MetricsLog, console_line


def _rows(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_drops_rollouts_at_or_after_the_resume_point(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, start_rollout=0, tensorboard=False, plot=False)
    for r in range(5):
        log.log(r, {"rollout/reward_mean": r / 10}, {"time/total": 1.0})
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"rollout_id": 5, "rollout/rew')  # torn line from a kill
    log = MetricsLog(tmp_path, start_rollout=3, tensorboard=False, plot=False)
    assert [r["rollout_id"] for r in _rows(tmp_path / "metrics.jsonl")] == [0, 1, 2]
    assert [r["rollout_id"] for r in _rows(tmp_path / "perf.jsonl")] == [0, 1, 2]
    log.log(3, {"rollout/reward_mean": 0.3}, {"time/total": 2.0})
    assert [r["rollout_id"] for r in _rows(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]


def test_resume_keeps_the_evaluations_the_checkpoint_records(tmp_path: Path) -> None:
    """Evaluation lines are kept up to the last evaluation the checkpoint records, whatever the rollout lines."""
    log = MetricsLog(tmp_path, start_rollout=0, tensorboard=False, plot=False)
    log.log_eval(0, {"eval/a/reward_mean": 0.1})
    for r in range(4):
        log.log(r, {"rollout/reward_mean": r / 10}, {"time/total": 1.0})
        if r % 2 == 1:
            log.log_eval(r + 1, {"eval/a/reward_mean": 0.2})
    log.close()
    MetricsLog(tmp_path, start_rollout=2, tensorboard=False, plot=False, evaluated=2).close()
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [(r.get("rollout_id"), r.get("eval_step")) for r in rows] == [(None, 0), (0, None), (1, None), (None, 2)]
    MetricsLog(tmp_path, start_rollout=0, tensorboard=False, plot=False, evaluated=None).close()
    assert _rows(tmp_path / "metrics.jsonl") == []


def test_tensorboard_and_plot_are_written(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, start_rollout=0, tensorboard=True, plot=True)
    for r in range(3):
        log.log(
            r,
            {
                "rollout/reward_mean": 0.1 * r,
                "train/kl_loss": 0.0,
                "train/entropy": 1.0,
                "rollout/response_len_mean": 3.0,
            },
            {"time/generate": 0.5},
        )
    log.log_eval(2, {"eval/held-out/reward_mean": 0.4, "eval/held-out/response_len_mean": 2.0})
    log.close()
    png = (tmp_path / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_console_line_shows_progress() -> None:
    line = console_line(
        4,
        10,
        {"rollout/samples": 256, "rollout/reward_mean": 0.5, "train/kl_loss": 0.01},
        {"time/generate": 1.5, "time/train": 2.0, "time/total": 4.0, "rollout/tokens_per_s": 123.0},
    )
    assert line.startswith("rollout 5/10 | samples 256 | gen 123 tok/s | reward 0.500 | kl 0.0100")
    assert "generate=1.50s" in line and "train=2.00s" in line and "total 4.00s" in line
