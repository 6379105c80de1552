"""The docs' ``miles`` commands, run: every example in cli.md, slurm.md and README.md must be a valid command.

Each ``miles ...`` line of a code block is parsed by the real argument parser.
Those that are cheap on a CPU machine and touch no cluster (``validate``,
``plan``, ``submit --dry-run``) run from the repository root, in-process, and
must exit as the doc shows: 0, or 2 when the doc shows an ``error:`` line; the
output lines the doc shows below a ``$ miles ...`` line must appear in that
order, ``...`` standing for any text. The commands that need a cluster run in
tests/integration/test_docs_commands.py.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from miles import cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("docs/cli.md", "docs/slurm.md", "README.md")


@dataclass(frozen=True)
class Example:
    doc: str
    line: int
    argv: tuple[str, ...]
    shown: tuple[str, ...]  # the output lines the doc shows for it

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def _argv(command: str) -> tuple[str, ...]:
    """``miles ARGS`` with its comment, pipe or redirection cut off, shell-split; variables expanded."""
    words = shlex.split(os.path.expandvars(command), comments=True)
    for i, w in enumerate(words):
        if w in ("|", ">", ">>", "&&", ";"):
            words = words[:i]
            break
    return tuple(words[1:])


def examples(doc: str) -> list[Example]:
    """Every ``miles`` command in ``doc``'s fenced or indented code blocks (continuation lines joined)."""
    lines = (ROOT / doc).read_text().splitlines()
    found: list[Example] = []
    fenced = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("```"):
            fenced = not fenced
            i += 1
            continue
        m = (
            re.match(r"\s*(\$ )?(miles (?!COMMAND)(?![a-z]+: error).*)", line)
            if fenced or line.startswith("    ")
            else None
        )
        if not m:
            i += 1
            continue
        start, command = i + 1, m.group(2)
        while command.endswith("\\"):
            i += 1
            command = command[:-1] + " " + lines[i].strip()
        shown: list[str] = []
        if m.group(1):  # a `$ miles ...` transcript: the lines below are its output
            while i + 1 < len(lines) and not lines[i + 1].startswith(("```", "$ ")):
                i += 1
                shown.append(lines[i])
        found.append(Example(doc, start, _argv(command), tuple(shown)))
        i += 1
    return found


ALL = [e for doc in DOCS for e in examples(doc)]
CHEAP = [e for e in ALL if e.argv[0] in ("validate", "plan") or (e.argv[0] == "submit" and "--dry-run" in e.argv)]


def test_the_docs_have_examples_of_every_command() -> None:
    assert {e.argv[0] for e in ALL} >= {"validate", "plan", "submit", "run", "status", "cancel"}
    assert len(CHEAP) >= 6


@pytest.mark.parametrize("example", ALL, ids=[e.id for e in ALL])
def test_every_documented_command_parses(example: Example) -> None:
    cli.build_parser().parse_args(list(example.argv))  # a SystemExit here is a doc naming a wrong option


def _appears(pattern: str, actual: str) -> bool:
    pieces = [p.strip() for p in pattern.split("...")]
    at = 0
    for p in pieces:
        j = actual.find(p, at)
        if j < 0:
            return False
        at = j + len(p)
    return True


@pytest.mark.parametrize("example", CHEAP, ids=[e.id for e in CHEAP])
def test_cheap_documented_commands_run_as_shown(
    example: Example, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ROOT)
    rc = cli.main(list(example.argv))
    out, err = capsys.readouterr()
    assert rc == (2 if any(": error:" in s for s in example.shown) else 0), err
    actual = (out + err).splitlines()
    at = 0
    for shown in example.shown:
        while at < len(actual) and not _appears(shown, actual[at]):
            at += 1
        assert at < len(actual), (
            f"{example.id}: the doc shows {shown!r}, which the command did not print:\n" + "\n".join(actual[:20])
        )
        at += 1
