"""Golden files: the rendered script and plan of every example spec, committed under tests/golden/.

``tests/unit/plan/test_golden.py`` renders each ``configs/*.toml`` and diffs it
against ``tests/golden/<stem>.sbatch`` and ``<stem>.plan.json``. When a change
to the templates or the planner is intended, accept the new output with::

    python -m miles.plan.golden --accept

and review ``git diff tests/golden``. Rendering is made machine-independent:
a relative run directory is replaced by ``/shared/runs/<stem>`` and the plan
uses the fixed job id :data:`JOB_ID`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

from miles.plan.planner import make_plan
from miles.plan.render import to_json
from miles.plan.script import render_script
from miles.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
GOLDEN = ROOT / "tests" / "golden"
JOB_ID = 4242
"""Job id of the golden plans (the script itself does not depend on it)."""

ACCEPT = "python -m miles.plan.golden --accept"


def config_paths() -> list[Path]:
    """Every example spec (the quickstart included when it exists)."""
    return sorted(CONFIGS.glob("*.toml"))


def render(config: Path) -> dict[str, str]:
    """Golden file name -> expected text, for one example spec."""

    spec = load_spec(config, [])
    if not spec.run.run_dir.startswith("/"):
        spec = dataclasses.replace(spec, run=dataclasses.replace(spec.run, run_dir=f"/shared/runs/{config.stem}"))
    plan = make_plan(spec, job_id=JOB_ID)
    return {f"{config.stem}.sbatch": render_script(spec, plan), f"{config.stem}.plan.json": to_json(plan) + "\n"}


def diff(name: str, expected: str, actual: str) -> str:
    """Unified diff of a golden file against a fresh rendering (empty when equal)."""
    return "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            fromfile=f"tests/golden/{name} (committed)",
            tofile=f"{name} (rendered now)",
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m miles.plan.golden", description=__doc__.split("\n")[0])
    parser.add_argument("--accept", action="store_true", help="write the rendered files into tests/golden/")
    args = parser.parse_args(argv)
    stale = 0
    for config in config_paths():
        for name, text in render(config).items():
            path = GOLDEN / name
            old = path.read_text() if path.exists() else ""
            if old == text:
                continue
            stale += 1
            if args.accept:
                GOLDEN.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(path.suffix + ".tmp")
                tmp.write_text(text)
                tmp.replace(path)
                print(f"wrote tests/golden/{name}")
            else:
                sys.stdout.write(diff(name, old, text))
    if stale and not args.accept:
        print(f"{stale} golden file(s) differ; accept with: {ACCEPT}")
        return 1
    if not stale:
        print("golden files are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
