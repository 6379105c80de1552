"""Reading a Miles or slime launch script into the flags it passes to ``train.py``.

Miles' recipes are bash: arrays of flags by group (``MODEL_ARGS``, ``CKPT_ARGS``,
``ROLLOUT_ARGS``, ...), a sourced model file that fills ``MODEL_ARGS``, and one
``python3 train.py ${MODEL_ARGS[@]} ...`` command (often behind ``ray job submit
... --``). This reader understands that much bash, and no more: assignments
(``NAME=value``, ``NAME=(...)``, ``NAME+=(...)``, ``export``), ``source`` /
``.`` of another file, ``${NAME}``, ``${NAME[@]}``, ``${NAME:-default}``, comments,
quotes and continuation lines. It runs nothing: a command substitution is
never executed (``$(dirname "${BASH_SOURCE[0]}")``-style script directories are
recognised; any other stays unexpanded and is reported).

A file without a ``train.py`` / ``train_async.py`` command is read as a plain
list of flags (one or many per line, ``#`` comments allowed).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from miles.errors import UserError

ENTRY_POINTS = ("train.py", "train_async.py")
"""Miles' and slime's training entry points; the flags that follow one are the run's flags."""

_ASSIGN = re.compile(r"^(?:export\s+|declare\s+(?:-a\s+)?|local\s+)?([A-Za-z_][A-Za-z0-9_]*)(\+?)=(.*)$", re.S)
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(\[[@*]\])?(?::?-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_SCRIPT_DIR = re.compile(r"\$\(.*(dirname|realpath|readlink).*(BASH_SOURCE|\$0).*\)", re.S)


@dataclass(frozen=True)
class FlagUse:
    """One flag as the script passes it, with where it was written."""

    flag: str
    """``--rollout-batch-size`` (as written, with dashes)."""
    values: tuple[str, ...]
    where: str
    """``file:line`` of the statement that holds it."""


@dataclass
class Script:
    """What a launch script passes to training."""

    path: Path
    entry_point: str
    """``train.py``, ``train_async.py``, or ``""`` for a plain flag list."""
    flags: list[FlagUse] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What the reader could not follow (an unknown variable, a command substitution), for the report."""


@dataclass
class _Statement:
    text: str
    where: str


@dataclass
class _Value:
    words: list[tuple[str, str]]
    """(word, where) pairs: an array's elements remember the line they were written on."""


def _statements(path: Path) -> list[_Statement]:
    """Logical statements of a file: continuation lines joined, quotes and array parentheses closed."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read the launch script: {e}") from None
    out: list[_Statement] = []
    buf: list[str] = []
    start = 0
    for i, line in enumerate(lines, 1):
        if not buf:
            start = i
            if not line.strip() or line.lstrip().startswith("#"):
                continue
        buf.append(line[:-1] if line.endswith("\\") else line)
        if line.endswith("\\"):
            continue
        text = "\n".join(buf)
        if not _complete(text):
            continue
        out.append(_Statement(text, f"{path}:{start}"))
        buf = []
    if buf:
        raise UserError(f"{path}:{start}: unterminated statement (an open quote or array parenthesis)")
    return out


def _complete(text: str) -> bool:
    """Whether quotes are closed and parentheses outside quotes and comments balance (an array's ``)`` came)."""
    depth, quote, escaped, comment, prev = 0, "", False, False, " "
    for ch in text:
        if comment:
            comment = ch != "\n"
        elif escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and prev in " \t\n(":
            comment = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        prev = ch
    return not quote and depth <= 0


class _Reader:
    def __init__(self, path: Path) -> None:
        self.root = path
        self.vars: dict[str, _Value] = {}
        self.script = Script(path=path, entry_point="")
        self.loose: list[FlagUse] = []
        self.seen: set[Path] = set()

    def note(self, text: str) -> None:
        if text not in self.script.notes:
            self.script.notes.append(text)

    def expand(self, word: str, where: str) -> list[tuple[str, str]]:
        """Expand variables in one shell word; ``${ARR[@]}`` alone becomes the array's words."""
        m = _VAR.fullmatch(word)
        if m and m.group(2):
            value = self.vars.get(m.group(1))
            if value is None:
                self.note(f"{where}: ${{{m.group(1)}[@]}} is not defined in the script; left out")
                return []
            return list(value.words)

        def one(m: re.Match[str]) -> str:
            name = m.group(1) or m.group(4)
            value = self.vars.get(name)
            if value is not None:
                return " ".join(w for w, _ in value.words)
            if m.group(3) is not None:
                return m.group(3)
            self.note(f"{where}: ${name} is not set in the script; left as ${name}")
            return m.group(0)

        return [(_VAR.sub(one, word), where)]

    def words(self, text: str, where: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        base = int(where.rsplit(":", 1)[1])
        file = where.rsplit(":", 1)[0]
        for n, line in enumerate(text.split("\n")):
            line_where = f"{file}:{base + n}"
            try:
                parts = shlex.split(line, comments=True)
            except ValueError:
                parts = shlex.split(text, comments=True)
                return [w for p in parts for w in self.expand(p, where)]
            for p in parts:
                out.extend(self.expand(p, line_where))
        return out

    def read(self, path: Path) -> None:
        path = path.resolve()
        if path in self.seen:
            return
        self.seen.add(path)
        for st in _statements(path):
            self.statement(st, path)

    def statement(self, st: _Statement, path: Path) -> None:
        text = st.text.strip()
        m = _ASSIGN.match(text)
        if m:
            name, append, rhs = m.group(1), m.group(2), m.group(3).strip()
            if rhs.startswith("("):
                inner = rhs[1 : rhs.rfind(")")] if ")" in rhs else rhs[1:]
                words = self.words(inner, st.where)
            elif _SCRIPT_DIR.search(rhs):
                words = [(str(path.parent), st.where)]
            else:
                if "$(" in rhs or "`" in rhs:
                    self.note(f"{st.where}: {name} is set by a command substitution, which miles convert does not run")
                words = [(" ".join(w for w, _ in self.words(rhs, st.where)), st.where)] if rhs else [("", st.where)]
            old = self.vars.get(name)
            self.vars[name] = _Value((old.words if (append and old) else []) + words)
            return
        try:
            first = shlex.split(text, comments=True)
        except ValueError:
            first = []
        if first and first[0] in ("source", "."):
            target = self.expand(first[1], st.where)[0][0] if len(first) > 1 else ""
            file = Path(target)
            if not file.is_absolute():
                file = path.parent / file
            if not file.is_file():
                self.note(f"{st.where}: sources {target}, which does not exist here; its flags are missing")
                return
            self.read(file)
            return
        words = self.words(text, st.where)
        names = [w for w, _ in words]
        hit = next((i for i, w in enumerate(names) if Path(w).name in ENTRY_POINTS), None)
        if hit is not None:
            if self.script.entry_point:
                self.note(f"{st.where}: a second training command; only the first is converted")
                return
            self.script.entry_point = Path(names[hit]).name
            self.script.flags = _flags(words[hit + 1 :])
        elif names and names[0].startswith("--"):
            self.loose.extend(_flags(words))


def _flags(words: list[tuple[str, str]]) -> list[FlagUse]:
    """``--a 1 2 --b --c=3`` -> flags with their values (words up to the next ``--`` word)."""
    out: list[FlagUse] = []
    cur: tuple[str, list[str], str] | None = None
    for word, where in words:
        if word.startswith("--") and len(word) > 2:
            if cur:
                out.append(FlagUse(cur[0], tuple(cur[1]), cur[2]))
            name, eq, value = word.partition("=")
            cur = (name, [value] if eq else [], where)
        elif cur is not None:
            cur[1].append(word)
    if cur:
        out.append(FlagUse(cur[0], tuple(cur[1]), cur[2]))
    return out


def read_script(path: str | Path) -> Script:
    """The flags a launch script passes to training (or a plain flag list's flags)."""
    reader = _Reader(Path(path))
    reader.read(Path(path))
    script = reader.script
    if not script.entry_point:
        if not reader.loose:
            raise UserError(
                f"{path}: no `python3 train.py ...` command and no --flags found; pass a Miles or slime "
                "launch script (bash) or a file of flags"
            )
        script.flags = reader.loose
    return script
