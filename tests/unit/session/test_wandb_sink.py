"""W&B as a metrics sink: the run id kept in the run directory, the mode, and what a real offline run holds.

Every W&B run here is the real ``wandb`` package in offline mode, writing under ``tmp_path`` (W&B's own logs
and cache go where ``tests/unit/conftest.py`` puts them): nothing reaches the network. What it wrote is read
back from its transaction log (``wandb_records``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import pytest

from miles.errors import UserError
from miles.preflight import check
from miles.session.metrics import MetricsLog
from miles.session.wandb_sink import WandbSink, init_arguments, run_id, sync_command
from miles.spec.tables import RunConfig, Spec
from tests.unit.session.wandb_records import read_offline_run

pytest.importorskip("wandb")


def _spec(**run: object) -> Spec:
    return Spec(run=dataclasses.replace(RunConfig(name="unit", num_rollout=2, use_wandb=True), **run))  # type: ignore[arg-type]


def test_the_run_id_is_made_once_and_kept_in_the_run_directory(tmp_path: Path) -> None:
    first = run_id(tmp_path)
    assert first.isalnum() and first.islower() and len(first) == 12
    assert (tmp_path / "wandb-run-id").read_text() == first + "\n"
    assert run_id(tmp_path) == first  # every later life of the run
    (tmp_path / "another").mkdir()
    assert run_id(tmp_path / "another") != first  # another run directory is another W&B run


def test_offline_is_the_default_and_online_is_asked_for(tmp_path: Path) -> None:
    offline = init_arguments(_spec(), tmp_path, "abc")
    assert offline["mode"] == "offline" and offline["id"] == "abc" and offline["resume"] == "allow"
    assert offline["dir"] == str(tmp_path) and offline["name"] == "unit"
    assert offline["project"] is None and offline["entity"] is None and offline["group"] is None
    online = init_arguments(
        _spec(wandb_mode="online", wandb_project="p", wandb_team="t", wandb_group="g", wandb_tags=["a", "b"]),
        tmp_path,
        "abc",
    )
    assert (online["mode"], online["project"], online["entity"], online["group"], online["tags"]) == (
        "online",
        "p",
        "t",
        "g",
        ["a", "b"],
    )
    assert online["config"]["run"]["wandb_project"] == "p"  # the resolved spec is the W&B run's config


def test_wandb_mode_takes_offline_or_online_only() -> None:
    from miles.spec.loader import spec_from_dict

    with pytest.raises(UserError) as e:
        spec_from_dict({"run": {"name": "x", "num_rollout": 1, "use_wandb": True, "wandb_mode": "disabled"}})
    assert e.value.exit_code == 2 and "wandb_mode" in str(e.value) and "offline" in str(e.value)


def test_a_missing_wandb_package_is_refused_before_the_run_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as on a machine without the package
    report = check(_spec(), local_only=True, skip=("data", "model", "resume"))
    (problem,) = [p for p in report.problems if "wandb" in str(p)]
    assert "pip install -c constraints.txt wandb" in str(problem) and "[run] use_wandb" in str(problem)
    assert not [
        p for p in check(_spec(use_wandb=False), True, ("data", "model", "resume")).problems if "wandb" in str(p)
    ]
    with pytest.raises(UserError, match="pip install -c constraints.txt wandb"):
        WandbSink.open(_spec(), Path("/nonexistent"))


def test_each_life_logs_what_tensorboard_gets_to_the_same_offline_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two lives of one run directory: one W&B run id, each rollout drawn against its ``rollout_id`` and each
    evaluation against its ``eval_step``, the spec as config, and the sync command that uploads both lives."""
    spec = _spec(wandb_project="proj", wandb_group="grp", wandb_tags=["cpu"])
    log = MetricsLog(tmp_path, 0, tensorboard=False, plot=False, wandb=WandbSink.open(spec, tmp_path))
    log.log_eval(0, {"eval/m/reward_mean": 0.25})
    log.log(0, {"rollout/reward_mean": 0.5}, {"time/total": 1.5})
    log.close()
    time.sleep(1.0)  # W&B names a life's folder by the second it started: two lives within one would share it
    resumed = MetricsLog(tmp_path, 1, tensorboard=False, plot=False, wandb=WandbSink.open(spec, tmp_path))
    resumed.log(1, {"rollout/reward_mean": 0.75}, {"time/total": 1.25})
    resumed.close()

    wandb_id = (tmp_path / "wandb-run-id").read_text().strip()
    lives = sorted((tmp_path / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(lives) == 2
    first, second = (read_offline_run(folder) for folder in lives)
    assert first.id == second.id == wandb_id
    assert (first.project, first.group, first.name, first.tags) == ("proj", "grp", "unit", ["cpu"])
    assert first.config["run"]["wandb_group"] == "grp" and first.config["run"]["num_rollout"] == 2
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in first.history + second.history]
    assert rows == [
        {"eval_step": 0, "eval/m/reward_mean": 0.25},
        {"rollout_id": 0, "rollout/reward_mean": 0.5, "time/total": 1.5},
        {"rollout_id": 1, "rollout/reward_mean": 0.75, "time/total": 1.25},
    ]
    axes = {"eval/m/reward_mean": "eval_step", "rollout/reward_mean": "rollout_id", "time/total": "rollout_id"}
    assert first.axes == axes and second.axes == {k: v for k, v in axes.items() if v == "rollout_id"}
    out = capsys.readouterr().out
    assert f"miles: W&B run {wandb_id} is saved offline" in out
    assert sync_command(tmp_path, wandb_id) in out
