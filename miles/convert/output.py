"""The converted spec (commented TOML), the flag table, and the check of the result.

Every key in the written spec says which flag and line it came from, so the
spec reads as a translation of the script. Keys that Miles fixes by leaving a
flag out are written explicitly with the reason (``[cluster] mode``, ``[rollout]
engine``), because miles' defaults are not always Miles'. The table lists every
flag of the script: the key it became, or its disposition and why.

The exit code is 2 when a flag that changes the experiment has no home (or the
written spec does not validate): the spec is still written, with those flags
listed at its end, so the user can decide.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miles.convert.bash import Script, read_script
from miles.convert.mapping import ASYNC_NOTE, Row, place
from miles.errors import UserError
from miles.plan import make_plan, summary
from miles.spec import spec_from_dict
from miles.spec.tables import TABLES
from miles.spec.writer import toml_key, toml_value

MILES_GPUS_PER_NODE = 8
"""Miles' ``--num-gpus-per-node`` default."""


@dataclass
class Conversion:
    """The result of converting one script."""

    script: Script
    rows: list[Row]
    tables: dict[str, dict[str, Any]]
    spec_text: str
    table_text: str
    check: str
    """``valid: ...`` (validate's summary) or the problems of the written spec."""
    exit_code: int
    origins: dict[tuple[str, str], str] = field(default_factory=dict)


def _rel(where: str, base: Path) -> str:
    file, _, line = where.rpartition(":")
    try:
        name = str(Path(file).resolve().relative_to(base.resolve()))
    except ValueError:
        name = Path(file).name
    return f"{name}:{line}"


Origins = dict[tuple[str, str], str]
"""``(table, key)`` -> where its value came from, for the spec's comments."""


def _collect(script: Script, rows: list[Row], base: Path) -> tuple[dict[str, dict[str, Any]], Origins]:
    tables: dict[str, dict[str, Any]] = {}
    origins: Origins = {}
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", script.path.stem).strip("-.") or "converted"
    tables["run"] = {"name": name}
    origins[("run", "name")] = "the script's file name"
    tables["rollout"] = {"engine": "sglang"}
    origins[("rollout", "engine")] = "Miles always runs SGLang engines"
    for row in rows:
        for table, key, value in row.keys:
            if key in tables.get(table, {}) and (table, key) in origins and ":" in origins[(table, key)]:
                script.notes.append(f"{row.use.flag} is given twice; the last value counts, as with argparse")
            tables.setdefault(table, {})[key] = value
            origins[(table, key)] = f"{row.use.flag} ({_rel(row.use.where, base)})"
    if script.entry_point == "train_async.py":
        tables["run"]["train_async"] = True
        origins[("run", "train_async")] = f"train_async.py: {ASYNC_NOTE}"
    cluster = tables.setdefault("cluster", {})
    if "mode" not in cluster:
        cluster["mode"] = "split"
        origins[("cluster", "mode")] = "no --colocate: Miles runs the engines on GPUs of their own"
    if "gpus_per_node" not in cluster:
        cluster["gpus_per_node"] = MILES_GPUS_PER_NODE
        origins[("cluster", "gpus_per_node")] = "Miles' --num-gpus-per-node default"
    return {t: tables[t] for t in TABLES if t in tables}, origins


def _spec_text(
    conv_script: Script, rows: list[Row], tables: dict[str, dict[str, Any]], origins: dict[tuple[str, str], str]
) -> str:
    entry = conv_script.entry_point or "a flag list"
    lines = [
        f"# Run spec converted by `miles convert` from {conv_script.path.name} ({entry}).",
        "# Each key names the Miles flag (and file:line) it came from; flags without a key are listed at the end,",
        "# with what miles does instead. `miles validate` this file before submitting it.",
    ]
    for table, keys in tables.items():
        lines += ["", f"[{table}]"]
        for key, value in keys.items():
            lines.append(f"{toml_key(key)} = {toml_value(value)}  # {origins.get((table, key), '')}".rstrip(" #"))
    rest = [r for r in rows if not r.keys]
    if rest:
        lines += ["", "# Flags without a key:"]
        for r in rest:
            value = (" " + " ".join(r.use.values)) if r.use.values else ""
            lines.append(f"#   {r.use.flag}{value}: {r.became}: {r.note}")
    return "\n".join(lines) + "\n"


def _table_text(rows: list[Row], base: Path) -> str:
    header = ("flag", "value", "became", "where")
    body = []
    for r in rows:
        value = " ".join(r.use.values) if r.use.values else "(on)"
        became = r.became + (f" ({r.note})" if r.note and not r.keys else "")
        if r.changes_experiment:
            became = "NO HOME, changes the experiment: " + became
        body.append((r.use.flag, value if len(value) <= 40 else value[:37] + "...", became, _rel(r.use.where, base)))
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(2)]
    out = []
    for flag, value, became, where in [header, *body]:
        out.append(
            f"{flag:<{widths[0]}}  {value:<{widths[1]}}  {became}  [{where}]"
            if where != "where"
            else f"{flag:<{widths[0]}}  {value:<{widths[1]}}  {became}"
        )
    return "\n".join(out) + "\n"


def _check(spec_text: str, source: str) -> tuple[str, bool]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    try:
        spec = spec_from_dict({"source": source, **tomllib.loads(spec_text)})
        return summary(spec, make_plan(spec)), True
    except UserError as e:
        return f"the converted spec does not validate:\n{e}", False


def convert(path: str | Path, output_name: str = "") -> Conversion:
    """Convert the launch script at ``path``; ``output_name`` is what the check calls the spec (its file name)."""
    script = read_script(path)
    base = script.path.resolve().parent
    rows = [place(use) for use in script.flags]
    tables, origins = _collect(script, rows, base)
    spec_text = _spec_text(script, rows, tables, origins)
    table = _table_text(rows, base)
    for note in script.notes:
        table += "note: " + note.replace(f"{base}/", "") + "\n"
    check, valid = _check(spec_text, output_name or f"{script.path.stem}.toml")
    lost = any(r.changes_experiment for r in rows)
    return Conversion(
        script=script,
        rows=rows,
        tables=tables,
        spec_text=spec_text,
        table_text=table,
        check=check,
        exit_code=2 if lost or not valid else 0,
        origins=origins,
    )
