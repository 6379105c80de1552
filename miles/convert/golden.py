"""Golden files of ``miles convert``: the spec and the flag table of every example Miles script.

``tests/unit/convert/test_golden.py`` converts each ``configs/miles/*.sh`` and
diffs the result against ``tests/golden/convert/<stem>.toml`` (the spec) and
``<stem>.txt`` (the table, the check of the spec, the exit code). When a change
is intended, accept the new output with::

    python -m miles.convert.golden --accept

and review ``git diff tests/golden/convert``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from miles.convert.output import convert
from miles.plan.golden import diff

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "configs" / "miles"
GOLDEN = ROOT / "tests" / "golden" / "convert"
ACCEPT = "python -m miles.convert.golden --accept"


def script_paths() -> list[Path]:
    """Every example launch script in Miles' syntax (the sourced model files live in models/)."""
    return sorted(SCRIPTS.glob("*.sh"))


def render(script: Path) -> dict[str, str]:
    """Golden file name -> expected text, for one script."""
    conv = convert(script, output_name=f"{script.stem}.toml")
    report = f"{conv.table_text}{conv.check}\nexit code {conv.exit_code}\n"
    return {f"{script.stem}.toml": conv.spec_text, f"{script.stem}.txt": report}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m miles.convert.golden", description=__doc__.split("\n")[0])
    parser.add_argument("--accept", action="store_true", help="write the converted files into tests/golden/convert/")
    args = parser.parse_args(argv)
    stale = 0
    for script in script_paths():
        for name, text in render(script).items():
            path = GOLDEN / name
            old = path.read_text() if path.exists() else ""
            if old == text:
                continue
            stale += 1
            if args.accept:
                GOLDEN.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote tests/golden/convert/{name}")
            else:
                sys.stdout.write(diff(f"convert/{name}", old, text))
    if stale and not args.accept:
        print(f"{stale} golden file(s) differ; accept with: {ACCEPT}")
        return 1
    if not stale:
        print("golden files are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
