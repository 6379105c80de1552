"""What the pre-flight check found: problems (each tied to the spec key that leads to it) and notes.

A problem starts with the ``file:line`` of the spec key that points at the bad
input, so that an editor jumps there; its message then names the bad file,
line or key itself and the fix. Notes say what was not checked on this
machine and why; they never stop a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from miles.errors import UserError
from miles.spec.keylines import KeyLines
from miles.spec.loader import parse_override
from miles.spec.problems import Origin, Problem


class PreflightError(UserError):
    """Inputs of a run that would fail once it started; every one found, one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        head = "nothing was submitted, started or written"
        if len(problems) == 1:
            text = f"{problems[0]}\n({head})"
        else:
            text = f"{len(problems)} problems with the run's inputs ({head}):\n" + "\n".join(f"  {p}" for p in problems)
        super().__init__(text)


@dataclass
class Report:
    """Problems and notes of one pre-flight check of the spec read from ``source``."""

    source: str
    overrides: Sequence[str] = ()
    """The ``--set`` arguments: a key set there is reported at its ``--set``, not at its line of the file."""
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _lines: KeyLines | None = None

    def __post_init__(self) -> None:
        try:
            self._lines = KeyLines(Path(self.source).read_text(encoding="utf-8")) if self.source else None
        except (OSError, UnicodeDecodeError):
            self._lines = None

    def origin(self, *path: str) -> Origin:
        """Where the spec key ``path`` (``"rollout", "prompt_data"``) is written."""
        for text in reversed(self.overrides):  # the last --set of a key wins, as in the loader
            try:
                parts, _ = parse_override(text)
            except ValueError:
                continue
            if tuple(parts) == path[: len(parts)] or tuple(parts[: len(path)]) == path:
                return Origin(f"--set {text}")
        line = self._lines.line_of(tuple(path)) if self._lines is not None else None
        return Origin(self.source or "<spec>", line)

    def problem(self, path: tuple[str, ...], message: str) -> None:
        where = f"[{path[0]}] {'.'.join(path[1:])}" if len(path) > 1 else f"[{path[0]}]"
        self.problems.append(Problem(self.origin(*path), where, message))

    def note(self, message: str) -> None:
        self.notes.append(message)

    def raise_if_any(self) -> None:
        if self.problems:
            raise PreflightError(self.problems)
