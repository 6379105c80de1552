"""Keys the tables accept that miles does not act on yet: refused at load time, naming what to do instead.

A key in a table must change what the program does (``tests/unit/spec/test_key_effects.py`` holds every key to
that). A key that mirrors a Miles flag whose capability miles has not built yet stays in its table, so that
``miles convert`` and the reference keep its place, but a spec that sets it to anything but its default is refused
here with exit 2, instead of running a different experiment from the one written. Each capability is its own entry,
so building one removes one entry.
"""

from __future__ import annotations

from collections.abc import Callable

from miles.spec.tables import TABLES, Spec

Report = Callable[[str, str, str], None]

NOT_YET: dict[str, dict[tuple[str, str], str]] = {}
"""Capability -> its keys -> what a run does without the key, and what to do instead. Every capability a key
of the tables names is built today."""


def refused_keys() -> set[tuple[str, str]]:
    """Every ``(table, key)`` refused here when set."""
    return {key for keys in NOT_YET.values() for key in keys}


def check(spec: Spec, report: Report) -> None:
    """Report every key of :data:`NOT_YET` that ``spec`` sets to something other than its default."""
    for capability, keys in NOT_YET.items():
        for (table, key), instead in keys.items():
            if getattr(getattr(spec, table), key) != getattr(TABLES[table](), key):
                report(table, key, f"miles does not support {capability} yet ({key}): {instead}")
