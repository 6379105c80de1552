"""The GPU case registry (``python -m miles.bench.cases``), checked on a CPU.

Every command a case would run on a GPU machine is parsed here with the real
parsers: ``miles bench`` by the CLI's and the suite's own argparse parsers
(a loop case's spec and ``--set`` overrides are loaded too), ``torchrun`` by
torch's, ``pytest`` selections against the files they name. A renamed option
or a moved test file fails here, not after a GPU machine has been started.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from miles.bench import cases
from miles.bench.cases import BY_NAME, CASES, MAX_CASE_S, Case, Step, argv_for, run_case, split

ROOT = Path(__file__).resolve().parents[3]
HISTORY = re.compile(r"session [0-9]|issues? [0-9]|\bh[0-9]{1,2}\b|lead|milestone|design\.md", re.I)
SUBJECTS = {"sync", "train", "rollout", "loop", "engine", "decode", "megatron", "cp"}
"""What a case name may start with: the thing it measures or checks."""
PLACEHOLDER = re.compile(r"\{(\w+)\}")
STEPS = [pytest.param(case, step, id=f"{case.name}:{i + 1}") for case in CASES for i, step in enumerate(case.steps)]


def test_names_are_unique_and_say_what_is_measured() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)) == len(BY_NAME)
    for name in names:
        words = name.split("-")
        assert re.fullmatch(r"[a-z0-9.]+(-[a-z0-9.]+)+", name), name
        assert words[0] in SUBJECTS, name
        assert not any(w.isdigit() for w in words), f"{name}: a bare number names nothing"
        assert not HISTORY.search(name), name


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case_is_described_and_fits_one_gpu_command(case: Case) -> None:
    assert len(case.description) >= 40 and not HISTORY.search(case.description), case.description
    assert case.steps and all(s.timeout_s > 0 for s in case.steps)
    assert case.budget_s <= MAX_CASE_S, f"{case.name}: {case.budget_s} s of limits"
    assert 1 <= case.gpus <= 8
    outputs = [w for s in case.steps for w in shlex.split(s.command) if "{out}" in w]
    assert len(outputs) == len(set(outputs)), f"{case.name} writes one file twice: {outputs}"


def _parse_miles(words: list[str]) -> tuple[str, object]:
    from miles.cli import build_parser

    try:
        top = build_parser().parse_args(words)
        assert top.command == "bench", words
        args = importlib.import_module(f"miles.bench.{top.suite}").parser().parse_args(top.args)
    except SystemExit:
        pytest.fail(f"argparse refused: miles {shlex.join(words)}")
    return top.suite, args


def _check_pytest(words: list[str], case: Case) -> None:
    paths, i, keyword = [], 0, None
    while i < len(words):
        w = words[i]
        if w in ("-m", "-k", "-p"):
            if w == "-m":
                assert words[i + 1] == "gpu", f"{case.name}: GPU runs select -m gpu"
            if w == "-k":
                keyword = words[i + 1]
            i += 2
            continue
        assert not w.startswith("-") or w in ("-q", "-s", "-x", "-v"), w
        if not w.startswith("-"):
            paths.append(w)
        i += 1
    assert "-m" in words and paths
    for path in paths:
        file = ROOT / path.split("::")[0]
        assert file.is_file(), path
        assert "pytest.mark.gpu" in file.read_text(encoding="utf-8"), f"{path} has no GPU-marked tests"
    if keyword is not None:
        assert _collect(paths, keyword), f"{case.name}: -k {keyword!r} selects no test"


def _collect(paths: list[str], keyword: str) -> list[str]:
    """Node ids that ``pytest -m gpu -k KEYWORD PATHS`` selects (collection only: CUDA is not needed)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "gpu",
            "-k",
            keyword,
            *paths,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return [line for line in proc.stdout.splitlines() if "::" in line]


@pytest.mark.parametrize(("case", "step"), STEPS)
def test_every_command_parses_with_the_real_parsers(case: Case, step: Step) -> None:
    env, words = split(step.command)
    assert all(k.isupper() for k in env), env
    assert set(PLACEHOLDER.findall(step.command)) <= {"out", "work"}, step.command
    argv_for(words)  # a known program
    program, rest = words[0], words[1:]
    if program == "miles":
        suite, args = _parse_miles(rest)
        if suite == "sync":
            assert case.gpus >= args.engines + 1, f"{case.name}: a trainer GPU and one per engine"
        if suite == "loop":
            from miles.spec import load_spec

            assert (ROOT / args.spec).is_file(), args.spec
            load_spec(ROOT / args.spec, args.overrides)
    elif program == "torchrun":
        from torch.distributed.run import get_args_parser

        tr = get_args_parser().parse_args(rest)
        assert tr.module and tr.training_script == "miles.cli", rest
        assert int(tr.nproc_per_node) <= case.gpus
        _parse_miles(tr.training_script_args)
    elif program == "pytest":
        _check_pytest(rest, case)
    else:  # python: a module with its own parser, or a script of the repository
        if rest[0] == "-m":
            module = importlib.import_module(rest[1])
            try:
                module.parser().parse_args(rest[2:])
            except SystemExit:
                pytest.fail(f"argparse refused: {step.command}")
        else:
            assert (ROOT / rest[0]).is_file(), rest[0]


def test_cp_selection_starts_only_the_context_parallel_ranks() -> None:
    """The 4-GPU CP case starts the four CP scenarios, not the whole file's worth of Megatron runs."""
    sys.path.insert(0, str(ROOT / "tests" / "gpu"))
    try:
        from test_megatron_gpu import selected_scenarios
    finally:
        sys.path.remove(str(ROOT / "tests" / "gpu"))
    _, words = split(BY_NAME["cp-equivalence-4gpu"].steps[0].command)
    ids = _collect(["tests/gpu/test_megatron_gpu.py"], words[words.index("-k") + 1])
    items = [
        SimpleNamespace(
            path=ROOT / i.split("::")[0],
            name=i.split("::")[1],
            callspec=SimpleNamespace(params={"name": i.split("[")[1].rstrip("]")}),
        )
        for i in ids
    ]
    assert selected_scenarios(items) == {
        "equiv_tp2cp2_fp32",
        "equiv_tp2cp2_bf16",
        "equiv_pp2cp2_fp32",
        "equiv_pp2cp2_bf16",
    }
    whole = [SimpleNamespace(path=ROOT / "tests/gpu/test_megatron_gpu.py", name="test_roundtrip_bit_identical")]
    assert selected_scenarios(whole) == {"roundtrip"}


def test_list_names_every_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert cases.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(f"{c.name}  (" in out for c in CASES)


def test_dry_run_prints_the_commands_with_the_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cases.main(["sync-1to1-7b", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"--json {tmp_path}/sync-1to1-7b/sync-1to1-7b.json" in out and "{out}" not in out
    assert not (tmp_path / "sync-1to1-7b").exists()
    assert cases.main(["no-such-case"]) == 2
    assert cases.main([]) == 2


def test_run_case_logs_each_command_and_reports_failures_and_timeouts(tmp_path: Path) -> None:
    case = Case(
        "engine-runner-check",
        1,
        "a case of three trivial commands, to check the runner itself",
        (
            Step(
                'GREETING=hello python -c \'import os; print(os.environ["GREETING"], os.environ["NCCL_NVLS_ENABLE"])\'',
                60,
            ),
            Step("python -c 'import sys; sys.exit(3)'", 60),
            Step("python -c 'import time; time.sleep(60)'", 1),
        ),
    )
    assert run_case(case, tmp_path, tail=5) == 1
    summary = json.loads((tmp_path / case.name / "summary.json").read_text())
    assert [s["rc"] for s in summary["steps"]] == [0, 3, 124]
    assert summary["steps"][2]["seconds"] < 30
    assert (tmp_path / case.name / "step-1.log").read_text().strip() == "hello 0"


def test_docs_cite_only_registered_cases_and_list_them_all() -> None:
    cited = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for pattern in (
            r"run\.sh\s+([a-z][a-z0-9.-]+)",
            r"miles\.bench\.cases\s+([a-z][a-z0-9.-]+)",
            r"[Cc]ases?:?\s+`([a-z][a-z0-9.-]+)`",
        ):
            cited |= {(doc.name, m) for m in re.findall(pattern, text)}
    assert cited and {name for _, name in cited} <= set(BY_NAME), sorted(cited)
    table = re.findall(r"^\| `([a-z][a-z0-9.-]+)` \| (\d) \|", (ROOT / "docs" / "benchmarks.md").read_text(), re.M)
    assert sorted(table) == sorted((c.name, str(c.gpus)) for c in CASES)
