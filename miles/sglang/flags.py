"""The pinned SGLang release's own launch-flag list, read statically from its wheel.

Why: every ``[sglang]`` key of a run spec that is not one of ``SglangConfig``'s
own fields is passed to ``python -m sglang.launch_server`` as a flag. A typo
there would otherwise only surface minutes into a Slurm job, as an argparse
error in an engine's log. So the loader (``miles.spec``) and the launcher
(``miles.sglang.launcher``) check every key against the flags that the
pinned SGLang release really declares, and name the closest one on a miss.

The list is generated from the wheel, not written by hand, and not by importing
SGLang (its import pulls CUDA kernels): ``ast`` reads the ``A[T, Arg(...)]``
field declarations in ``sglang/srt/arg_groups/fields/*.py`` (the namespaces
that ``server_args.py`` collects into ``ServerArgs``) and the manual
``parser.add_argument`` calls in ``ServerArgs.add_cli_args``, applying the same
rules as SGLang's ``add_cli_args_from_dataclass``.

Regenerate after bumping :data:`SGLANG_PIN`::

    pip download --no-deps sglang==<pin> -d .cache/sglang
    python -m miles.sglang.flags --wheel .cache/sglang/sglang-<pin>-*.whl

``tests/unit/sglang/test_conformance.py`` checks that the committed
file equals what the pinned wheel gives.

File format of ``miles/spec/sglang_flags.json`` (what the loader reads)::

    {
      "version": "0.5.20",
      "flags": {
        "<flag>": {                    # the CLI flag without "--", dashes -> underscores,
                                       # i.e. exactly the TOML key a user writes in [sglang]
          "type": "int" | "float" | "str" | "bool" | "list" | "json",
          "default": <JSON value or null>,   # SGLang's declared default (null also when
                                             # the default is computed at run time)
          "choices": [...],            # optional: the closed set of accepted values
                                       # (for "list", of each item)
          "item_type": "int" | "float" | "str",  # only for "list"
          "negatable": true,           # optional, bools only: SGLang also has --no-<flag>,
                                       # so false can be passed explicitly
          "nargs": "?",                # optional: the flag may be given without a value
          "aliases": ["<alias>", ...], # optional: other spellings (same underscore form)
          "deprecated": true           # optional: SGLang still accepts it but warns
        }
      }
    }

How a TOML value maps to a type: ``int`` takes a TOML integer; ``float`` an
integer or float; ``str`` a string; ``bool`` a boolean (``true`` adds the bare
flag, ``false`` adds nothing, or ``--no-<flag>`` when ``negatable``); ``list``
a TOML array of ``item_type`` values (passed as ``--flag v1 v2``); ``json`` any
TOML value (table or array), passed as one JSON string argument.

Keys that miles sets itself from other spec fields (model path, host, port,
TP size, ...) must not appear under ``[sglang]``; ``miles.spec.passthrough``
lists them (``MANAGED_FLAGS``) and rejects them with the spec field to use.

This module imports neither torch nor SGLang, so ``miles.spec`` may import it.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SGLANG_PIN = "0.5.20"
"""The one SGLang release miles is built, generated and tested against.

Bumping it re-runs the flag generation check, the request-body conformance
tests and the CPU integration environment (``scripts/sglang-env.sh``)."""

FLAGS_PATH = Path(__file__).resolve().parent.parent / "spec" / "sglang_flags.json"
"""The committed flag list for :data:`SGLANG_PIN`."""

_FIELDS_DIR = "sglang/srt/arg_groups/fields/"
_SERVER_ARGS = "sglang/srt/server_args.py"
_CHOICES = "sglang/srt/arg_groups/choices.py"


class _Unresolved(Exception):
    """An expression whose value is only known when SGLang runs (a call, a registry)."""


@dataclass
class _Source:
    """The wheel's Python files by path, and a cache of their parsed module-level names."""

    files: dict[str, str]

    def module_path(self, dotted: str) -> str | None:
        base = dotted.replace(".", "/")
        for cand in (base + ".py", base + "/__init__.py"):
            if cand in self.files:
                return cand
        return None

    def tree(self, path: str) -> ast.Module:
        return ast.parse(self.files[path], filename=path)

    def module_name_value(self, path: str, name: str, depth: int = 0) -> Any:
        """Value of a module-level ``name`` in ``path``: an assignment, a class or an import."""
        if depth > 8:
            raise _Unresolved(name)
        tree = self.tree(path)
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return self.evaluate(node.value, path, depth + 1)
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                if node.value is None:
                    raise _Unresolved(name)
                return self.evaluate(node.value, path, depth + 1)
            if isinstance(node, ast.ClassDef) and node.name == name:
                return ("class", path, node)
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        target = self.module_path(node.module)
                        if target is None:
                            raise _Unresolved(name)
                        return self.module_name_value(target, alias.name, depth + 1)
        raise _Unresolved(name)

    def evaluate(self, node: ast.expr, path: str, depth: int = 0) -> Any:
        """Constant-fold an expression: literals, names, ``Cls.ATTR``, list concatenation."""
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            out: list[Any] = []
            for elt in node.elts:
                if isinstance(elt, ast.Starred):
                    out.extend(self.evaluate(elt.value, path, depth))
                else:
                    out.append(self.evaluate(elt, path, depth))
            return out if not isinstance(node, ast.Tuple) else tuple(out)
        if isinstance(node, ast.Dict):
            return {
                self.evaluate(k, path, depth): self.evaluate(v, path, depth)
                for k, v in zip(node.keys, node.values, strict=True)
                if k is not None
            }
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self.evaluate(node.operand, path, depth)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = self.evaluate(node.left, path, depth), self.evaluate(node.right, path, depth)
            return left + right if isinstance(node.op, ast.Add) else left * right
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("set", "list", "sorted"):
            if len(node.args) == 1 and not node.keywords:
                items = self.evaluate(node.args[0], path, depth)
                return sorted(items, key=str) if node.func.id != "list" else list(items)
        if isinstance(node, ast.Name):
            value = self.module_name_value(path, node.id, depth)
            if isinstance(value, tuple) and value[:1] == ("class",):
                raise _Unresolved(node.id)
            return value
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            owner = self.module_name_value(path, node.value.id, depth)
            if isinstance(owner, tuple) and owner[:1] == ("class",):
                _, cls_path, cls = owner
                for stmt in cls.body:
                    if isinstance(stmt, ast.Assign) and any(
                        isinstance(t, ast.Name) and t.id == node.attr for t in stmt.targets
                    ):
                        return self.evaluate(stmt.value, cls_path, depth + 1)
        raise _Unresolved(ast.unparse(node))


def _read_wheel(wheel: Path) -> _Source:
    with zipfile.ZipFile(wheel) as zf:
        files = {
            name: zf.read(name).decode("utf-8")
            for name in zf.namelist()
            if name.startswith("sglang/srt/") and name.endswith(".py")
        }
    return _Source(files)


def _call_kwargs(call: ast.Call) -> dict[str, ast.expr]:
    return {kw.arg: kw.value for kw in call.keywords if kw.arg is not None}


def _annotation_parts(ann: ast.expr) -> tuple[ast.expr, ast.expr | None] | None:
    """``A[T, meta]`` -> (T, meta); anything else (no CLI surface) -> None."""
    if not (isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name) and ann.value.id in ("A", "Annotated")):
        return None
    sl = ann.slice
    if not isinstance(sl, ast.Tuple) or len(sl.elts) < 2:
        return None
    inner = sl.elts[0]
    for meta in sl.elts[1:]:
        if isinstance(meta, ast.Constant) and isinstance(meta.value, str):
            return inner, None
        if isinstance(meta, ast.Call) and isinstance(meta.func, ast.Name) and meta.func.id == "Arg":
            return inner, meta
    return None


def _type_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):
        return _type_name(node.value)
    if isinstance(node, ast.Constant) and node.value is None:
        return "None"
    return ast.unparse(node)


def _unwrap_optional(node: ast.expr) -> ast.expr:
    """``Optional[X]``, ``X | None`` and ``Union[X, None]`` -> X (only for one non-None member)."""
    if isinstance(node, ast.Subscript) and _type_name(node.value) == "Optional":
        return node.slice
    if isinstance(node, ast.Subscript) and _type_name(node.value) == "Union" and isinstance(node.slice, ast.Tuple):
        members = [e for e in node.slice.elts if _type_name(e) != "None"]
        if len(members) == 1:
            return members[0]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        members = [e for e in (node.left, node.right) if _type_name(e) != "None"]
        if len(members) == 1:
            return members[0]
    return node


_SCALARS = {"int": "int", "float": "float", "str": "str", "bool": "bool"}
_JSON_PARSERS = {"loads", "json_list_type"}
_INT_PARSERS = {"human_readable_int"}


def _flag_from_field(src: _Source, path: str, stmt: ast.AnnAssign) -> tuple[str, dict[str, Any]] | None:
    """One dataclass field -> (flag key, entry), mirroring ``add_cli_args_from_dataclass``."""
    assert isinstance(stmt.target, ast.Name)
    field_name = stmt.target.id
    parts = _annotation_parts(stmt.annotation)
    if parts is None:
        return None
    raw_type, meta = parts
    kw = _call_kwargs(meta) if isinstance(meta, ast.Call) else {}

    def kw_value(name: str) -> Any:
        return src.evaluate(kw[name], path) if name in kw else None

    if kw_value("no_cli"):
        return None
    cli_name = kw_value("cli_name") or "--" + field_name.replace("_", "-")
    entry: dict[str, Any] = {}
    entry["default"] = _default_of(src, path, stmt.value)
    inner = _unwrap_optional(raw_type)
    tname = _type_name(inner)
    parser = _type_name(kw["type_parser"]) if "type_parser" in kw else None
    action = _type_name(kw["action"]) if "action" in kw else None

    if action is not None:
        if action == "BooleanOptionalAction":
            entry["type"] = "bool"
            entry["negatable"] = True
        else:  # a custom action taking values (e.g. LoRAPathAction with nargs="*")
            action_nargs = _dict_constant(kw.get("action_kwargs"), "nargs")
            entry["type"] = "list" if action_nargs in ("*", "+") else "str"
            if entry["type"] == "list":
                entry["item_type"] = "str"
    elif tname == "Literal":
        values = src.evaluate(inner.slice, path) if isinstance(inner, ast.Subscript) else []
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        entry["type"] = _SCALARS.get(type(values[0]).__name__, "str") if values else "str"
        entry["choices"] = _choices(src, path, kw.get("choices")) or values
    elif tname in ("List", "list") and parser is None:
        entry["type"] = "list"
        item = inner.slice if isinstance(inner, ast.Subscript) else None
        entry["item_type"] = _SCALARS.get(_type_name(item), "str") if item is not None else "str"
        if entry["item_type"] == "bool":
            entry["item_type"] = "str"
    elif tname == "bool" and parser is None:
        entry["type"] = "bool"
    elif parser in _JSON_PARSERS:
        entry["type"] = "json"
    elif parser in _INT_PARSERS:
        entry["type"] = "int"
    elif parser is not None:
        entry["type"] = "str"
    else:
        entry["type"] = {"int": "int", "float": "float"}.get(tname, "str")
    if "choices" not in entry and "choices" in kw:
        choices = _choices(src, path, kw["choices"])
        if choices is not None:
            entry["choices"] = choices
    nargs = kw_value("nargs")
    if nargs == "?":
        entry["nargs"] = "?"
    elif nargs in ("*", "+") and entry["type"] != "list":
        entry["item_type"] = entry["type"] if entry["type"] in ("int", "float", "str") else "str"
        entry["type"] = "list"
    aliases = kw_value("aliases") or []
    if aliases:
        entry["aliases"] = [a.lstrip("-").replace("-", "_") for a in aliases]
    return cli_name.lstrip("-").replace("-", "_"), entry


def _dict_constant(node: ast.expr | None, key: str) -> Any:
    """The constant value of ``key`` in a dict display (other entries may be arbitrary expressions)."""
    if isinstance(node, ast.Dict):
        for k, v in zip(node.keys, node.values, strict=True):
            if isinstance(k, ast.Constant) and k.value == key and isinstance(v, ast.Constant):
                return v.value
    return None


def _choices(src: _Source, path: str, node: ast.expr | None) -> list[Any] | None:
    if node is None:
        return None
    try:
        value = src.evaluate(node, path)
    except _Unresolved:
        return None  # computed at run time (a plugin registry): accept any value
    return list(value) if isinstance(value, (list, tuple, set)) else None


def _default_of(src: _Source, path: str, node: ast.expr | None) -> Any:
    if node is None:
        return None
    if isinstance(node, ast.Call) and _type_name(node.func) == "field":  # msgspec.field(default_factory=...)
        factory = _call_kwargs(node).get("default_factory")
        name = _type_name(factory) if factory is not None else ""
        return {"list": [], "dict": {}, "set": []}.get(name)
    try:
        value = src.evaluate(node, path)
    except _Unresolved:
        return None
    if isinstance(value, (tuple, set)):
        value = list(value)
    try:
        json.dumps(value)
    except TypeError:
        return None
    return value


def _input_namespaces(src: _Source) -> list[str]:
    """Class names listed in ``_INPUT_NAMESPACES`` of server_args.py: the classes ServerArgs collects."""
    for node in src.tree(_SERVER_ARGS).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_INPUT_NAMESPACES" for t in node.targets
        ):
            assert isinstance(node.value, ast.List)
            return [_type_name(e) for e in node.value.elts]
    raise ValueError(f"{_SERVER_ARGS} has no _INPUT_NAMESPACES list; SGLang's layout changed, update this generator")


def _field_flags(src: _Source) -> dict[str, dict[str, Any]]:
    wanted = set(_input_namespaces(src))
    found: set[str] = set()
    flags: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in src.files if p.startswith(_FIELDS_DIR)):
        for node in src.tree(path).body:
            if not (isinstance(node, ast.ClassDef) and node.name in wanted):
                continue
            found.add(node.name)
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    flag = _flag_from_field(src, path, stmt)
                    if flag is not None:
                        flags[flag[0]] = flag[1]
    missing = wanted - found
    if missing:
        raise ValueError(f"namespaces {sorted(missing)} not found under {_FIELDS_DIR}")
    return flags


def _manual_flags(src: _Source, field_defaults: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``parser.add_argument`` calls in ``ServerArgs.add_cli_args`` (dynamic choices, deprecated flags)."""
    out: dict[str, dict[str, Any]] = {}
    for node in ast.walk(src.tree(_SERVER_ARGS)):
        if not (isinstance(node, ast.FunctionDef) and node.name == "add_cli_args"):
            continue
        for call in ast.walk(node):
            if not (
                isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "add_argument"
            ):
                continue
            names = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if not names or not names[0].startswith("--"):
                continue
            key = names[0].lstrip("-").replace("-", "_")
            kw = _call_kwargs(call)
            action = kw.get("action")
            action_name = _type_name(action).strip("'\"") if action is not None else None
            entry: dict[str, Any] = {}
            if action_name is not None and (action_name.endswith("store_true") or "StoreTrue" in action_name):
                entry["type"] = "bool"
                entry["default"] = False
            else:
                entry["type"] = _SCALARS.get(_type_name(kw["type"]), "str") if "type" in kw else "str"
                default = kw.get("default")
                if isinstance(default, ast.Call) and _type_name(default.func) == "_declared_default":
                    arg = default.args[0]
                    known = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
                    entry["default"] = field_defaults.get(known) if known is not None else None
                else:
                    entry["default"] = _default_of(src, _SERVER_ARGS, default)
                choices = _choices(src, _SERVER_ARGS, kw.get("choices"))
                if choices is not None:
                    entry["choices"] = choices
            if (
                action_name is not None
                and action_name.startswith("Deprecated")
                or key.startswith("enable_flashinfer_a")
            ):
                entry["deprecated"] = True
            if len(names) > 1:
                entry["aliases"] = [n.lstrip("-").replace("-", "_") for n in names[1:]]
            out[key] = entry
    return out


def _field_defaults(src: _Source) -> dict[str, Any]:
    """Declared default of every collected field, by field name (for ``_declared_default``)."""
    wanted = set(_input_namespaces(src))
    out: dict[str, Any] = {}
    for path in sorted(p for p in src.files if p.startswith(_FIELDS_DIR)):
        for node in src.tree(path).body:
            if isinstance(node, ast.ClassDef) and node.name in wanted:
                for stmt in node.body:
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                        out[stmt.target.id] = _default_of(src, path, stmt.value)
    return out


def flags_from_wheel(wheel: Path) -> dict[str, Any]:
    """The flag table of an SGLang wheel, in the file format described in this module's docstring."""
    src = _read_wheel(wheel)
    version = wheel.name.split("-")[1]
    flags = _field_flags(src)
    flags.update(_manual_flags(src, _field_defaults(src)))
    ordered = {key: {k: flags[key][k] for k in sorted(flags[key])} for key in sorted(flags)}
    return {"version": version, "flags": ordered}


def render(table: dict[str, Any]) -> str:
    """The exact text committed to :data:`FLAGS_PATH` (stable, so the equality test is meaningful)."""
    return json.dumps(table, indent=1, sort_keys=False) + "\n"


def load_flags(path: Path = FLAGS_PATH) -> dict[str, dict[str, Any]]:
    """The committed flag table: flag key -> entry."""
    table = json.loads(path.read_text())
    flags: dict[str, dict[str, Any]] = table["flags"]
    return flags


def alias_map(flags: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Every accepted spelling (flag key or alias) -> its flag key."""
    out = {key: key for key in flags}
    for key, entry in flags.items():
        for alias in entry.get("aliases", []):
            out.setdefault(alias, key)
    return out


def closest_flag(name: str, names: Iterable[str]) -> str | None:
    """The most similar known flag, for "did you mean" messages."""
    matches = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m miles.sglang.flags",
        description=f"Regenerate {FLAGS_PATH.name} from an SGLang wheel (pinned: {SGLANG_PIN}).",
    )
    parser.add_argument("--wheel", type=Path, required=True, help="sglang-<version>-*.whl (pip download --no-deps)")
    parser.add_argument("--out", type=Path, default=FLAGS_PATH, help="where to write the JSON")
    args = parser.parse_args(argv)
    table = flags_from_wheel(args.wheel)
    if table["version"] != SGLANG_PIN:
        print(f"warning: wheel is {table['version']}, SGLANG_PIN is {SGLANG_PIN}; bump the pin too", file=sys.stderr)
    _write_atomic(args.out, render(table))
    print(f"wrote {len(table['flags'])} flags of sglang {table['version']} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
