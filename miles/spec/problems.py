"""Where a spec value came from, and the error that lists everything wrong with a spec.

A user who fixes one mistake only to be told about the next one, run after run,
stops trusting the tool; so the loader collects every problem it finds into a
:class:`Problems` list and raises one :class:`SpecError` that shows them all,
one per line, each starting with ``file:line`` so that editors can jump there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from miles.errors import UserError


@dataclass(frozen=True)
class Origin:
    """Where a value was written: a file and line, or a ``--set`` argument (line is then None)."""

    source: str
    line: int | None = None

    def __str__(self) -> str:
        return self.source if self.line is None else f"{self.source}:{self.line}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec: where, which key, and a message that says what to change."""

    origin: Origin
    where: str
    """``[table] key`` (or ``[table]``) the problem is about; empty for file-level problems."""
    message: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.where}: {self.message}" if self.where else f"{self.origin}: {self.message}"


class SpecError(UserError):
    """A run spec that cannot be used: every problem found, one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        # In file order, so that the list reads top to bottom next to the spec.
        self.problems = sorted(problems, key=lambda p: (p.origin.source, p.origin.line or 0))
        if len(self.problems) == 1:
            text = str(self.problems[0])
        else:
            text = f"{len(self.problems)} problems in the run spec:\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(text)


@dataclass
class Problems:
    """An accumulator of problems; :meth:`raise_if_any` turns them into one :class:`SpecError`."""

    items: list[Problem] = field(default_factory=list)

    def add(self, origin: Origin, where: str, message: str) -> None:
        self.items.append(Problem(origin, where, message))

    def raise_if_any(self) -> None:
        if self.items:
            raise SpecError(self.items)
