"""Strict checking of TOML values against the tables' type hints and ranges.

TOML is typed, and so is every spec field; a value of the wrong type is an
error rather than something coerced, because coercion hides mistakes (``"8"``
for 8, ``1`` for ``true``). Two relaxations only: an integer is accepted where a
float is expected (``lr = 1`` means 1.0), and ``None`` is accepted for ``X | None``
fields when a spec comes from JSON (TOML itself has no null; leaving a key out
means "unset").
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import types
import typing
from typing import Any, Literal, Union

from miles.spec.writer import toml_value

_NAMES = {
    bool: ("true or false", "true or false"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
}


class Mismatch(Exception):
    """A value does not fit a type; ``expected`` says what would, ``detail`` narrows down where."""

    def __init__(self, expected: str, detail: str = "") -> None:
        super().__init__(expected)
        self.expected = expected
        self.detail = detail


def table_fields(cls: type) -> dict[str, tuple[Any, dataclasses.Field[Any]]]:
    """The fields of a table dataclass by name, with their resolved type hints."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def _optional_parts(tp: Any) -> tuple[list[Any], bool]:
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = list(typing.get_args(tp))
        return [a for a in args if a is not type(None)], type(None) in args
    return [tp], False


def describe(tp: Any, plural: bool = False) -> str:
    """Human words for a type: ``an integer``, ``one of "k1", "k2"``, ``a list of strings``."""
    parts, _ = _optional_parts(tp)
    if len(parts) > 1:
        return " or ".join(describe(p, plural) for p in parts)
    tp = parts[0]
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(_toml_repr(a) for a in typing.get_args(tp))
    if origin is list:
        (elem,) = typing.get_args(tp)
        return ("lists" if plural else "a list") + f" of {describe(elem, plural=True)}"
    if origin is dict:
        _, val = typing.get_args(tp)
        if val is object:
            return "tables" if plural else "a table"
        return ("tables" if plural else "a table") + f" of {describe(val, plural=True)}"
    if tp is object:
        return "any values" if plural else "any value"
    single, many = _NAMES.get(tp, (str(tp), str(tp)))
    return many if plural else single


def convert(value: Any, tp: Any) -> Any:
    """Return ``value`` checked against ``tp`` (ints widened to float where a float is expected); raise Mismatch."""
    parts, optional = _optional_parts(tp)
    if value is None:
        if optional:
            return None
        raise Mismatch(describe(tp))
    if len(parts) > 1:
        for part in parts:
            try:
                return convert(value, part)
            except Mismatch:
                continue
        raise Mismatch(describe(tp))
    tp = parts[0]
    origin = typing.get_origin(tp)
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in typing.get_args(tp)):
            return value
        raise Mismatch(describe(tp))
    if origin is list:
        (elem,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise Mismatch(describe(tp))
        out = []
        for i, item in enumerate(value):
            try:
                out.append(convert(item, elem))
            except Mismatch as e:
                raise Mismatch(describe(tp), f"element {i + 1} is {given(item)}") from e
        return out
    if origin is dict:
        _, val = typing.get_args(tp)
        if not isinstance(value, dict):
            raise Mismatch(describe(tp))
        out_d = {}
        for k, item in value.items():
            try:
                out_d[k] = convert(item, val)
            except Mismatch as e:
                raise Mismatch(describe(tp), f"entry {k!r} is {given(item)}") from e
        return out_d
    if tp is object:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise Mismatch(describe(tp))


def given(value: Any) -> str:
    """How a user's value is shown in a message: its TOML spelling and its kind."""
    if isinstance(value, bool):
        return _toml_repr(value)
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {_toml_repr(value)}"
    if isinstance(value, str):
        return f"the string {_toml_repr(value)}"
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        kind = type(value).__name__
        return f"the {kind} {value.isoformat()} (put it in quotes to make it a string)"
    if isinstance(value, list):
        return f"the list {_clip(_toml_repr(value))}"
    if isinstance(value, dict):
        return f"the table {_clip(_toml_repr(value))}"
    if value is None:
        return "null"
    return repr(value)


def range_violation(value: Any, metadata: typing.Mapping[str, Any]) -> str | None:
    """``must be > 0`` when ``value`` breaks a ``ge/gt/le/lt`` bound of the field, else None."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    bounds = describe_range(metadata)
    ok = True
    if "ge" in metadata:
        ok &= value >= metadata["ge"]
    if "gt" in metadata:
        ok &= value > metadata["gt"]
    if "le" in metadata:
        ok &= value <= metadata["le"]
    if "lt" in metadata:
        ok &= value < metadata["lt"]
    if isinstance(value, float) and math.isnan(value):
        ok = not bounds
    return None if ok else f"must be {bounds}"


def describe_range(metadata: typing.Mapping[str, Any]) -> str:
    """``>= 0 and < 1`` from a field's metadata; empty when it has no bounds."""
    ops = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
    return " and ".join(f"{sym} {_toml_repr(metadata[k])}" for k, sym in ops if k in metadata)


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _toml_repr(value: Any) -> str:
    try:
        return toml_value(value)
    except TypeError:
        return repr(value)
