"""Writing a Spec back out: the resolved TOML that goes into the run directory, and a JSON-ready dict.

The resolved spec is what a run actually used (the fourth knob derived, the run
and checkpoint directories filled in, every default spelled out), so that a
run directory explains itself and ``miles run <run_dir>/spec.toml`` repeats the
run. It is written with a small TOML emitter rather than a dependency: the
tables only hold strings, numbers, booleans, lists and flat tables.
``load_spec(spec_to_toml(s))`` gives back ``s`` (apart from ``source``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import Any

from miles.spec.tables import TABLES, Spec

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+\Z")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_key(key: str) -> str:
    """A key as TOML spells it: bare when it can be, else a quoted string."""
    return key if _BARE_KEY.match(key) else toml_value(key)


def toml_value(value: Any) -> str:
    """One value in TOML syntax (inline tables for dicts); TypeError for what TOML cannot hold (None)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        out = []
        for ch in value:
            if ch in _ESCAPES:
                out.append(_ESCAPES[ch])
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{toml_key(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"TOML cannot hold {value!r}")


def _table_items(spec: Spec, name: str) -> list[tuple[str, Any]]:
    table = getattr(spec, name)
    items = [(f.name, getattr(table, f.name)) for f in dataclasses.fields(table) if f.name != "server_args"]
    if name == "sglang":
        items.extend(spec.sglang.server_args.items())
    return items


def spec_to_toml(spec: Spec) -> str:
    """The resolved spec as TOML text: every table, every set key; unset (None) keys are left out."""
    lines = [
        f"# Resolved run spec written by miles from {toml_value(spec.source)}: every key explicit,",
        "# the four batch knobs derived, directories filled in. `miles run` accepts this file as it is.",
    ]
    for name in TABLES:
        lines.append("")
        lines.append(f"[{name}]")
        for key, value in _table_items(spec, name):
            if value is not None:
                lines.append(f"{toml_key(key)} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    """The spec as plain data for JSON: ``{"source": ..., table: {key: value}}``; unset keys are null.

    ``[sglang]`` pass-through flags sit next to the table's own keys, as in TOML,
    so that :func:`miles.spec.spec_from_dict` reads this back through the same
    strict checks as a file.
    """
    out: dict[str, Any] = {"source": spec.source}
    for name in TABLES:
        out[name] = {key: copy.deepcopy(value) for key, value in _table_items(spec, name)}
    return out
