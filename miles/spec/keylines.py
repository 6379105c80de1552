"""Line numbers of TOML keys, which ``tomllib`` does not report.

Error messages that say ``run.toml:14`` let a user jump to the mistake; tomllib
returns plain dicts without positions, so this module scans the text itself. It
runs only on text tomllib has already accepted, which keeps the scanner small:
it follows table headers, ``key = value`` lines (bare, quoted and dotted keys)
and skips over multi-line strings and arrays so that text inside values is never
mistaken for a key. Keys inside inline tables map to the line of the table's key
(best effort); :meth:`KeyLines.line_of` falls back to the nearest recorded parent.
"""

from __future__ import annotations

import re
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_BARE = re.compile(r"[A-Za-z0-9_-]+")


class KeyLines:
    """Map of key paths (``("rollout", "rollout_batch_size")``) to 1-based line numbers."""

    def __init__(self, text: str) -> None:
        self._lines: dict[tuple[str, ...], int] = {}
        self._scan(text.splitlines())

    def line_of(self, path: tuple[str, ...]) -> int | None:
        """Line of ``path``, else of its nearest recorded parent, else None."""
        for k in range(len(path), 0, -1):
            line = self._lines.get(path[:k])
            if line is not None:
                return line
        return None

    def _record(self, path: tuple[str, ...], line: int) -> None:
        for k in range(1, len(path) + 1):
            self._lines.setdefault(path[:k], line)

    def _scan(self, lines: list[str]) -> None:
        table: tuple[str, ...] = ()
        i = 0
        while i < len(lines):
            text = lines[i]
            pos = _skip_ws(text, 0)
            if pos >= len(text) or text[pos] == "#":
                i += 1
                continue
            if text[pos] == "[":
                double = text.startswith("[[", pos)
                parts, _ = _parse_key(text, pos + (2 if double else 1))
                if parts:
                    table = tuple(parts)
                    self._lines.setdefault(table, i + 1)
                i += 1
                continue
            parts, end = _parse_key(text, pos)
            if not parts or end >= len(text) or text[end] != "=":
                i += 1  # not something we understand; tomllib accepted it, so skip it
                continue
            self._record(table + tuple(parts), i + 1)
            i = _skip_value(lines, i, end + 1) + 1


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    return pos


def _parse_key(text: str, pos: int) -> tuple[list[str], int]:
    """Parse a (dotted) key at ``pos``; return its parts and the position after it and its trailing blanks."""
    parts: list[str] = []
    while True:
        pos = _skip_ws(text, pos)
        if pos >= len(text):
            return parts, pos
        ch = text[pos]
        if ch in "\"'":
            close = pos + 1
            while close < len(text) and text[close] != ch:
                close += 2 if (ch == '"' and text[close] == "\\") else 1
            quoted = text[pos : close + 1]
            try:
                parts.append(tomllib.loads(f"k = {quoted}")["k"])
            except tomllib.TOMLDecodeError:
                parts.append(quoted[1:-1])
            pos = close + 1
        else:
            m = _BARE.match(text, pos)
            if not m:
                return parts, pos
            parts.append(m.group(0))
            pos = m.end()
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ".":
            pos += 1
            continue
        return parts, pos


def _skip_value(lines: list[str], i: int, pos: int) -> int:
    """Skip the value that starts at ``lines[i][pos]``; return the index of the line where it ends."""
    depth = 0
    while i < len(lines):
        text = lines[i]
        while pos < len(text):
            ch = text[pos]
            if ch == "#":
                break
            if text.startswith('"""', pos) or text.startswith("'''", pos):
                i, pos = _skip_multiline_string(lines, i, pos)
                text = lines[i]
                continue
            if ch in "\"'":
                pos += 1
                while pos < len(text) and text[pos] != ch:
                    pos += 2 if (ch == '"' and text[pos] == "\\") else 1
                pos += 1
                continue
            if ch in "[{":
                depth += 1
            elif ch in "]}":
                depth -= 1
            pos += 1
        if depth <= 0:
            return i
        i += 1
        pos = 0
    return len(lines) - 1


def _skip_multiline_string(lines: list[str], i: int, pos: int) -> tuple[int, int]:
    delim = lines[i][pos : pos + 3]
    pos += 3
    while i < len(lines):
        text = lines[i]
        while pos < len(text):
            if delim == '"""' and text[pos] == "\\":
                pos += 2
                continue
            if text.startswith(delim, pos):
                pos += 3
                while pos < len(text) and text[pos] == delim[0]:  # up to two quotes may end the content
                    pos += 1
                return i, pos
            pos += 1
        i += 1
        pos = 0
    return len(lines) - 1, 0
