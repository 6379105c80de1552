"""Reading launch scripts: the bash miles convert understands, and plain flag lists."""

from __future__ import annotations

from pathlib import Path

import pytest

from miles.convert.bash import read_script
from miles.errors import UserError


def _flags(path: Path) -> dict[str, tuple[str, ...]]:
    return {f.flag: f.values for f in read_script(path).flags}


def test_arrays_sourced_files_defaults_and_continuations(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.sh").write_text(
        'MODEL_ARGS=(\n  --num-layers 4  # four\n  --rotary-base "${BASE:-500}"\n  --moe-layer-freq "([1]*4)"\n)\n'
    )
    script = tmp_path / "run.sh"
    script.write_text(
        '#!/bin/bash\nSCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" &>/dev/null && pwd)"\n'
        'source "${SCRIPT_DIR}/m/model.sh"\nLR=2e-6\nA=(--lr $LR)\nA+=(--colocate)\n'
        'JSON="{\n  \\"a\\": 1\n}"\n'
        'ray job submit --runtime-env-json="${JSON}" \\\n  -- python3 train.py \\\n  ${MODEL_ARGS[@]} \\\n'
        "  ${A[@]} --prompt-data=/d.jsonl\n"
    )
    s = read_script(script)
    assert s.entry_point == "train.py"
    flags = _flags(script)
    assert flags == {
        "--num-layers": ("4",),
        "--rotary-base": ("500",),
        "--moe-layer-freq": ("([1]*4)",),
        "--lr": ("2e-6",),
        "--colocate": (),
        "--prompt-data": ("/d.jsonl",),
    }
    where = {f.flag: f.where for f in s.flags}
    assert where["--num-layers"].endswith("model.sh:2") and where["--lr"].endswith("run.sh:5")


def test_a_plain_flag_list(tmp_path: Path) -> None:
    path = tmp_path / "flags.txt"
    path.write_text("# my flags\n--rollout-batch-size 8 --n-samples-per-prompt 4\n--use-kl-loss\n")
    s = read_script(path)
    assert s.entry_point == "" and _flags(path) == {
        "--rollout-batch-size": ("8",),
        "--n-samples-per-prompt": ("4",),
        "--use-kl-loss": (),
    }


def test_what_the_reader_cannot_follow_is_noted(tmp_path: Path) -> None:
    path = tmp_path / "run.sh"
    path.write_text("N=$(nproc)\nsource ./missing.sh\npython3 train_async.py --num-rollout $STEPS ${ARGS[@]}\n")
    s = read_script(path)
    assert s.entry_point == "train_async.py"
    notes = "\n".join(s.notes)
    assert "command substitution" in notes and "missing.sh" in notes and "$STEPS" in notes and "ARGS" in notes


def test_nothing_to_convert_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.sh"
    path.write_text("echo hello\n")
    with pytest.raises(UserError, match="no `python3 train.py ...` command"):
        read_script(path)
