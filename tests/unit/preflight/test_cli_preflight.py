"""What passes pre-flight, what it skips and says so, and where its messages point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from miles import cli
from miles.model.architectures import sglang_architectures
from miles.preflight import check
from miles.spec import load_spec
from tests.unit.preflight.workspace import DROP, QWEN2, ROWS, Workspace

ROOT = Path(__file__).resolve().parents[3]
ELSEWHERE = "/no-such-top-level-dir-of-this-machine"


def test_a_valid_workspace_passes_and_submit_reaches_sbatch(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(ws.spec)]) == 0
    assert capsys.readouterr().err == ""
    assert cli.main(["submit", str(ws.spec)]) == 0
    assert any(call.startswith("sbatch --parsable") for call in ws.slurm_calls()), ws.slurm_calls()
    assert (ws.root / "runs" / "t" / "job.sbatch").is_file()


def test_a_valid_workspace_passes_for_run(ws: Workspace) -> None:
    report = check(load_spec(ws.spec), local_only=True)
    assert report.problems == [] and report.notes == []


def test_a_valid_model_directory_and_a_matching_checkpoint_pass(
    ws: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    ws.model_dir(config=QWEN2, extra={"tokenizer_config.json": "{}"})
    ws.write("rm_ok.py", "def score(args, sample):\n    return 1.0\n")
    ws.write_spec(
        {
            "model": {"builtin": DROP, "hf_checkpoint": "model"},
            "perf": {"backend": "megatron"},
            "rollout": {"rm_type": DROP, "custom_rm_path": "rm_ok.py:score"},
        }
    )
    ws.checkpoint([])
    assert cli.main(["validate", str(ws.spec), "--set", "perf.backend=fsdp"]) == 2  # the checkpoint was megatron's
    assert "perf.backend: checkpoint has 'megatron', spec has 'fsdp'" in capsys.readouterr().err
    assert cli.main(["validate", str(ws.spec)]) == 0


def test_remote_code_passes_when_trusted(ws: Workspace) -> None:
    ws.model_dir(config={"model_type": "custom_lm", "auto_map": {"AutoModelForCausalLM": "modeling.CustomLM"}})
    ws.write_spec({"model": {"builtin": DROP, "hf_checkpoint": "model", "trust_remote_code": True}})
    assert check(load_spec(ws.spec), local_only=False).problems == []


@pytest.mark.skipif(sglang_architectures() is not None, reason="SGLang is installed here, so its check runs")
def test_sglang_architectures_are_left_to_the_engines_when_sglang_is_absent(ws: Workspace) -> None:
    ws.model_dir(config=QWEN2)
    ws.write_spec({"model": {"builtin": DROP, "hf_checkpoint": "model"}, "rollout": {"engine": "sglang"}})
    report = check(load_spec(ws.spec), local_only=False)
    assert report.problems == []
    assert any("SGLang is not installed here" in n for n in report.notes), report.notes


def test_paths_of_the_compute_nodes_are_noted_for_submit_and_refused_by_run(
    ws: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    ws.write_spec(
        {
            "rollout": {"prompt_data": f"{ELSEWHERE}/train.jsonl"},
            "model": {"builtin": DROP, "hf_checkpoint": f"{ELSEWHERE}/model"},
        }
    )
    assert cli.main(["validate", str(ws.spec)]) == 0
    err = capsys.readouterr().err
    assert f"note: rollout.prompt_data: {ELSEWHERE} does not exist on this machine" in err
    assert f"note: model.hf_checkpoint: {ELSEWHERE} does not exist on this machine" in err
    assert cli.main(["submit", str(ws.spec), "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("#!")
    assert cli.main(["run", str(ws.spec)]) == 2
    err = capsys.readouterr().err
    assert f"{ELSEWHERE}/train.jsonl: no such file or directory" in err and "hf_checkpoint" in err
    assert not (ws.root / "runs").exists() and ws.slurm_calls() == []


def test_skip_check_skips_one_check_and_says_so(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    ws.write_spec({"rollout": {"prompt_data": "missing.jsonl", "rm_type": DROP, "custom_rm_path": "nosuchmod:f"}})
    assert cli.main(["validate", str(ws.spec), "--skip-check", "data"]) == 2  # the reward is still checked
    err = capsys.readouterr().err
    assert "nosuchmod" in err and "missing.jsonl" not in err.split("skipped pre-flight checks")[-1]
    assert cli.main(["validate", str(ws.spec), "--skip-check", "data", "--skip-check", "code"]) == 0
    assert "note: skipped pre-flight checks: code, data" in capsys.readouterr().err
    assert cli.main(["validate", str(ws.spec), "--skip-check", "all"]) == 0


def test_only_the_head_of_a_file_is_read(ws: Workspace) -> None:
    ws.write("long.jsonl", "".join(json.dumps(ROWS[i % 8]) + "\n" for i in range(100)) + "{\n")
    ws.write_spec({"rollout": {"prompt_data": "long.jsonl"}})
    assert check(load_spec(ws.spec), local_only=True).problems == []  # line 101: found when the run loads the data


def test_a_problem_points_at_the_spec_line_of_its_key(ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    ws.write_spec({"rollout": {"prompt_data": "missing.jsonl"}})
    assert cli.main(["validate", str(ws.spec)]) == 2
    line = ws.line_of("prompt_data =")
    assert capsys.readouterr().err.startswith(f"miles validate: error: {ws.spec}:{line}: [rollout] prompt_data: ")


def test_pre_flight_does_not_import_torch(ws: Workspace) -> None:
    ws.model_dir(config=QWEN2)
    ws.write("dev.jsonl", json.dumps(ROWS[0]) + "\n")
    ws.write_spec(
        {
            "model": {"builtin": DROP, "hf_checkpoint": "model"},
            "perf": {"backend": "megatron"},
            "eval": {"eval_prompt_data": {"dev": "dev.jsonl"}, "eval_interval": 1},
        }
    )
    ws.checkpoint([])
    code = (
        "import sys; from miles.cli import main; assert main(['validate', 'spec.toml']) == 0; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": ws.env_path()}
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ws.root, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
