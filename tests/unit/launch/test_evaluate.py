"""``miles eval``'s refusals, before any engine starts: no eval data, a directory that is not an HF model."""

from __future__ import annotations

from pathlib import Path

import pytest

from miles import cli
from miles.errors import UserError
from miles.launch.evaluate import model_dir_for
from miles.spec import load_spec

ROOT = Path(__file__).resolve().parents[3]


def test_a_miles_checkpoint_is_refused_naming_the_directories_that_work(tmp_path: Path) -> None:
    spec = load_spec(ROOT / "configs" / "quickstart-eval.toml")
    ckpt = tmp_path / "checkpoints" / "rollout-000020"
    (ckpt / "actor").mkdir(parents=True)
    with pytest.raises(UserError, match=r"not an HF model directory .*<run_dir>/final.*save_hf"):
        model_dir_for(spec, str(ckpt))
    with pytest.raises(UserError, match="no such directory"):
        model_dir_for(spec, str(tmp_path / "absent"))
    (ckpt / "config.json").write_text("{}")
    assert model_dir_for(spec, str(ckpt)) == ckpt


def test_a_spec_without_eval_data_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["eval", str(ROOT / "configs" / "quickstart.toml"), "--model", str(ROOT)])
    assert code == 2
    assert "miles eval needs [eval] eval_prompt_data" in capsys.readouterr().err
