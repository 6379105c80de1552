"""What becomes of each flag, and when miles convert exits 2."""

from __future__ import annotations

from pathlib import Path

from miles.cli import main
from miles.convert import Conversion, convert

BASE = (
    "--hf-checkpoint /m --prompt-data /d.jsonl --rm-type math --num-rollout 2 --rollout-batch-size 4 "
    "--n-samples-per-prompt 2 --global-batch-size 8 --actor-num-gpus-per-node 2 --num-gpus-per-node 2 "
    "--train-backend fsdp --colocate"
)


def _convert(tmp_path: Path, extra: str) -> Conversion:
    path = tmp_path / "flags.txt"
    path.write_text(f"{BASE} {extra}\n")
    return convert(path)


def test_a_plain_flag_list_converts_and_validates(tmp_path: Path) -> None:
    conv = _convert(tmp_path, "--attention-dropout 0.0 --balance-data --sglang-chunked-prefill-size 512")
    assert conv.exit_code == 0, conv.check
    assert conv.check.startswith("valid:")
    assert conv.tables["sglang"] == {"chunked_prefill_size": 512}
    assert conv.tables["cluster"]["gpus_per_node"] == 2


def test_partial_rollout_flags_convert_to_their_keys_and_need_over_sampling(tmp_path: Path) -> None:
    flags = "--partial-rollout --mask-offpolicy-in-partial-rollout"
    conv = _convert(tmp_path, f"--over-sampling-batch-size 8 {flags}")
    assert conv.exit_code == 0, conv.check
    rollout = conv.tables["rollout"]
    assert (rollout["partial_rollout"], rollout["mask_offpolicy_in_partial_rollout"]) == (True, True)
    alone = _convert(tmp_path, flags)  # nothing is aborted without over-sampling: the written spec is refused
    assert alone.exit_code == 2 and "partial_rollout" in alone.check


def test_a_non_zero_dropout_changes_the_experiment_and_has_no_home(tmp_path: Path) -> None:
    conv = _convert(tmp_path, "--attention-dropout 0.1")
    assert conv.exit_code == 2
    assert "NO HOME, changes the experiment: fixed in miles" in conv.table_text
    assert "this script asks for 0.1" in conv.table_text


def test_an_unknown_flag_is_not_supported_and_fails(tmp_path: Path) -> None:
    conv = _convert(tmp_path, "--custom-reward-post-process-path my.rewards:post")
    assert conv.exit_code == 2
    assert "not supported (miles has no key for this flag)" in conv.table_text


def test_speed_only_flags_without_a_home_do_not_fail(tmp_path: Path) -> None:
    conv = _convert(tmp_path, "--use-precision-aware-optimizer --overlap-cpu-optimizer-d2h-h2d")
    assert conv.exit_code == 0
    assert conv.table_text.count("not supported (") == 2


def test_no_colocate_is_written_as_split_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "split.txt"
    path.write_text(BASE.replace("--colocate", "--rollout-num-gpus 2").replace("--num-gpus-per-node 2", "") + "\n")
    conv = convert(path)
    assert 'mode = "split"  # no --colocate: Miles runs the engines on GPUs of their own' in conv.spec_text
    assert conv.exit_code == 0 and "one node" in conv.check


def test_a_renamed_sglang_flag_fails_validation_with_the_suggestion(tmp_path: Path) -> None:
    conv = _convert(tmp_path, "--sglang-cuda-graph-max-bs 64")
    assert conv.exit_code == 2
    assert "does not validate" in conv.check and "did you mean" in conv.check


def test_cli_writes_the_spec_and_prints_the_table(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    script = tmp_path / "flags.txt"
    script.write_text(BASE + "\n")
    out = tmp_path / "spec.toml"
    assert main(["convert", str(script), "-o", str(out)]) == 0
    assert out.read_text().startswith("# Run spec converted by `miles convert` from flags.txt")
    printed = capsys.readouterr().out
    assert "--train-backend" in printed and '[perf] backend = "fsdp"' in printed and f"wrote {out}" in printed
    assert main(["validate", str(out)]) == 0
