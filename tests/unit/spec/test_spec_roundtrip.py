"""The resolved spec written to the run directory loads back to an equal Spec; so does its JSON form."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from miles.spec import Spec, SpecError, load_spec, passthrough, spec_from_dict, spec_to_dict, spec_to_toml
from tests.unit.spec.specfiles import SpecFiles

ROOT = Path(__file__).parents[3]


def roundtrip(spec: Spec, tmp_path: Path) -> Spec:
    out = tmp_path / "resolved.toml"
    out.write_text(spec_to_toml(spec))
    again = load_spec(out)
    assert again.source == str(out)
    return dataclasses.replace(again, source=spec.source)


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.toml")))
def test_configs_roundtrip(config: str, tmp_path: Path) -> None:
    spec = load_spec(ROOT / "configs" / config)
    assert roundtrip(spec, tmp_path) == spec
    assert spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))) == spec


def test_awkward_values_roundtrip(specs: SpecFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(passthrough, "FLAGS_FILE", tmp_path / "absent.json")
    path, _ = specs.write(
        {
            "run": {"name": 'we"ird $(x) `y` é'},
            "rollout": {
                "rollout_stop": ["\n\n", "</s>", "\u0001"],
                "apply_chat_template_kwargs": {"enable_thinking": False, "nested": {"a": [1, 2.5, "x"]}},
                "rollout_temperature": 0.7,
                "rollout_batch_size": 4,
            },
            "grpo": {"eps_clip_c": 3.0, "kl_loss_coef": 1e-3, "use_kl_loss": True},
            "optimizer": {"lr": 1e-6, "adam_eps": 1e-15},
            "slurm": {
                "env": {"NCCL_DEBUG": "INFO", "PATH": "/a:$PATH"},
                "setup": ["source /x/y.sh", "echo 'hi'"],
                "container_mounts": ["/data:/data:ro"],
                "container_runtime": "pyxis",
                "container_image": "nvcr.io#x",
                "reservation": "tab\there\\back",
            },
            "sglang": {
                "chunked_prefill_size": 4096,
                "json_model_override_args": {"rope": {"f": 2}},
                "enable_metrics": True,
            },
        }
    )
    spec = load_spec(path)
    assert spec.sglang.server_args["chunked_prefill_size"] == 4096
    assert roundtrip(spec, tmp_path) == spec
    assert spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))) == spec


def test_resolved_toml_spells_out_the_derived_knob(specs: SpecFiles) -> None:
    path, _ = specs.write()
    text = spec_to_toml(load_spec(path))
    assert "num_steps_per_rollout = 1\n" in text and 'run_dir = "runs/t"\n' in text
    assert 'save = "runs/t/checkpoints"\n' in text


def test_spec_from_dict_is_strict(specs: SpecFiles) -> None:
    path, _ = specs.write()
    data = spec_to_dict(load_spec(path))
    data["run"]["seed"] = "x"
    data["train"]["zzz"] = 1
    with pytest.raises(SpecError) as info:
        spec_from_dict(data)
    message = str(info.value)
    assert f"{path}: [run] seed: expected an integer" in message
    assert f"{path}: [train] zzz: unknown key in [train]" in message
