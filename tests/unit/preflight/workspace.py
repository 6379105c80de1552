"""A scratch directory with a valid run spec and its inputs, which each bad-input case then breaks in one way.

The directory is the current directory while a case runs (relative paths in a
spec count from there), and ``PATH`` starts with Slurm client tools that only
record that they were called, so that a test can tell whether ``miles submit``
reached Slurm at all.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from miles.ckpt.state import binding_fields
from miles.spec import load_spec
from miles.spec.writer import toml_key, toml_value

DROP = object()
"""A change that removes the key from the base spec."""

BASE: dict[str, dict[str, Any]] = {
    "run": {"name": "t", "num_rollout": 2},
    "model": {"builtin": "tiny-arith", "dtype": "float32"},
    "rollout": {
        "engine": "embedded",
        "prompt_data": "prompts.jsonl",
        "input_key": "prompt",
        "label_key": "label",
        "rollout_batch_size": 4,
        "n_samples_per_prompt": 2,
        "rm_type": "exact_match",
    },
    "train": {"global_batch_size": 8},
    "perf": {"backend": "fsdp"},
    "cluster": {
        "mode": "colocate",
        "gpus_per_node": 0,
        "actor_num_nodes": 1,
        "actor_num_gpus_per_node": 2,
        "device": "cpu",
    },
}

ROWS = [{"prompt": f"{a}+{a}=", "label": str(2 * a)} for a in range(8)]

QWEN2 = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 32,
    "intermediate_size": 128,
}

_TOOL = """#!/bin/sh
echo "$(basename "$0") $*" >> {record}
case "$(basename "$0")" in
  scontrol) echo "Slurmctld(primary) at ctl is UP" ;;
  sinfo) echo "node1|debug*|64|(null)" ;;
  sbatch) echo "4242" ;;
esac
"""


def render(changes: dict[str, dict[str, Any]] | None = None) -> str:
    tables = json.loads(json.dumps(BASE))
    for table, keys in (changes or {}).items():
        target = tables.setdefault(table, {})
        for key, value in keys.items():
            if value is DROP:
                target.pop(key, None)
            else:
                target[key] = value
    lines = ["# a bad-input case"]
    for table, keys in tables.items():
        lines += ["", f"[{table}]"] + [f"{toml_key(k)} = {toml_value(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


class Workspace:
    """The case's directory: ``spec.toml``, ``prompts.jsonl`` and helpers to break them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.spec = root / "spec.toml"
        self.record = root / "slurm-calls.log"
        self.tools = root / "bin"
        self.tools.mkdir()
        for tool in ("sbatch", "scontrol", "sinfo", "squeue", "sacct", "scancel"):
            path = self.tools / tool
            path.write_text(_TOOL.format(record=shlex.quote(str(self.record))))
            path.chmod(0o755)
        self.write_spec()
        self.write_rows("prompts.jsonl", ROWS)

    def write_spec(self, changes: dict[str, dict[str, Any]] | None = None) -> Path:
        self.spec.write_text(render(changes))
        return self.spec

    def line_of(self, needle: str) -> int:
        """1-based line of the spec that starts with ``needle`` (a key)."""
        lines = self.spec.read_text().splitlines()
        return next(i + 1 for i, line in enumerate(lines) if line.startswith(needle))

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return path

    def write_rows(self, name: str, rows: list[Any]) -> Path:
        return self.write(name, "".join(json.dumps(r) + "\n" for r in rows))

    def model_dir(
        self,
        name: str = "model",
        config: Any = None,
        *,
        config_text: str | None = None,
        tokenizer: bool = True,
        weights: bool = True,
        extra: dict[str, str] | None = None,
    ) -> Path:
        """An HF-shaped directory (config.json, weights and tokenizer files; contents are not loaded)."""
        root = self.root / name
        root.mkdir(parents=True)
        if config_text is not None or config is not None:
            (root / "config.json").write_text(config_text if config_text is not None else json.dumps(config))
        if weights:
            (root / "model.safetensors").write_bytes(b"\0" * 8)
        if tokenizer:
            (root / "tokenizer.json").write_text("{}")
        for file, text in (extra or {}).items():
            (root / file).write_text(text)
        return root

    def checkpoint(
        self,
        saved_overrides: list[str],
        rollout_id: int = 2,
        root: str = "runs/t/checkpoints",
        driver: str | None = None,
    ) -> Path:
        """A complete checkpoint (manifest present) saved by the base spec with ``saved_overrides`` applied."""
        spec = load_spec(self.spec, saved_overrides)
        path = self.root / root / f"rollout-{rollout_id:06d}"
        path.mkdir(parents=True)
        text = json.dumps({"rollout_id": rollout_id, "spec": binding_fields(spec)}) if driver is None else driver
        (path / "driver.json").write_text(text)
        (path / "MANIFEST.json").write_text(json.dumps({"rollout_id": rollout_id, "files": {}}))
        return path

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """Every file and directory under the workspace (bytecode caches aside) with its size and mtime."""
        out = {}
        for p in self.root.rglob("*"):
            if "__pycache__" in p.parts:
                continue
            st = p.stat()
            out[str(p.relative_to(self.root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
        return out

    def slurm_calls(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []

    def env_path(self) -> str:
        return f"{self.tools}{os.pathsep}{os.environ.get('PATH', '')}"
