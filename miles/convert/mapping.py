"""Miles' flags -> run-spec keys, one row per flag saying what became of it.

The rules are the spec's own: a flag is the key of the same name (underscores
for dashes) in whichever table has it, else its alias
(:data:`miles.spec.miles_flags.ALIASES`), else its disposition
(:data:`~miles.spec.miles_flags.DISPOSITIONS`); ``--sglang-X`` is ``[sglang] X``.
A few flags carry more than one key's worth of meaning and are spelled out
here (``--colocate``, ``--offload``, ``--bf16``, ``--eval-prompt-data``). What is
none of these is "not supported", and counts as changing the experiment:
miles cannot tell that an unknown flag is harmless.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from miles.convert.bash import FlagUse
from miles.spec.fieldtypes import Mismatch, convert, table_fields
from miles.spec.miles_flags import ALIASES, DISPOSITIONS, SGLANG_PREFIX, flag_key, key_tables
from miles.spec.tables import TABLES
from miles.spec.writer import toml_value

Status = Literal["key", "always", "fixed", "model", "unsupported", "invalid"]


@dataclass(frozen=True)
class Row:
    """What became of one flag."""

    use: FlagUse
    status: Status
    keys: tuple[tuple[str, str, Any], ...] = ()
    """``(table, key, value)`` written into the spec."""
    note: str = ""
    changes_experiment: bool = False

    @property
    def became(self) -> str:
        if self.keys:
            return ", ".join(f"[{t}] {k} = {_show(v)}" for t, k, v in self.keys)
        return {
            "always": "always on in miles",
            "fixed": "fixed in miles",
            "model": "read from config.json",
            "unsupported": "not supported",
            "invalid": "not converted",
            "key": "",
        }[self.status]


def _show(value: Any) -> str:

    return toml_value(value)


def _word(text: str) -> Any:
    """A flag's value word as TOML would type it: integer, float, boolean or string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _wants(tp: Any, kind: type) -> bool:
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    parts = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
    for p in parts:
        if p is kind or typing.get_origin(p) is kind:
            return True
        if typing.get_origin(p) is Literal and all(isinstance(a, kind) for a in typing.get_args(p)):
            return True
    return False


def _value(values: tuple[str, ...], tp: Any) -> Any:
    if not values:
        return True
    if _wants(tp, list):
        (elem,) = typing.get_args(next(a for a in ([tp] + list(typing.get_args(tp))) if typing.get_origin(a) is list))
        return [v if elem is str else _word(v) for v in values]
    if _wants(tp, dict):
        return json.loads(values[0])
    if len(values) > 1:
        raise Mismatch("one value", f"got {len(values)}: {' '.join(values)}")
    return values[0] if _wants(tp, str) else _word(values[0])


def _key_row(use: FlagUse, table: str, key: str, value: Any = None) -> Row:
    tp = table_fields(TABLES[table])[key][0]
    try:
        raw = _value(use.values, tp) if value is None else value
        return Row(use, "key", ((table, key, convert(raw, tp)),))
    except (Mismatch, ValueError) as e:
        detail = e.expected if isinstance(e, Mismatch) else str(e)
        return Row(use, "invalid", note=f"[{table}] {key} expects {detail}", changes_experiment=True)


def _special(use: FlagUse, name: str) -> Row | None:
    if name == "colocate":
        return Row(use, "key", (("cluster", "mode", "colocate"),))
    if name == "offload":
        return Row(use, "key", (("perf", "offload_train", True), ("perf", "offload_rollout", True)))
    if name in ("bf16", "fp16"):
        return Row(use, "key", (("model", "dtype", "bfloat16" if name == "bf16" else "float16"),))
    if name == "eval_prompt_data":
        if len(use.values) % 2 or not use.values:
            return Row(use, "invalid", note="expects NAME PATH pairs", changes_experiment=True)
        pairs = dict(zip(use.values[::2], use.values[1::2], strict=True))
        return Row(use, "key", (("eval", "eval_prompt_data", pairs),))
    if name == "train_backend" and use.values and use.values[0] not in ("megatron", "fsdp"):
        return Row(use, "invalid", note="miles' backends are megatron and fsdp", changes_experiment=True)
    return None


def place(use: FlagUse) -> Row:
    """The row of one flag: the key(s) it became, or its disposition."""
    name = flag_key(use.flag)
    special = _special(use, name)
    if special is not None:
        return special
    if name in ALIASES:
        table, key = ALIASES[name].split(".")
        return _key_row(use, table, key)
    tables = key_tables().get(name)
    if tables:
        return _key_row(use, tables[0], name)
    disp = DISPOSITIONS.get(name)
    if disp is None and name.startswith(SGLANG_PREFIX):
        flag = name[len(SGLANG_PREFIX) :]
        value: Any = (
            True
            if not use.values
            else (_word(use.values[0]) if len(use.values) == 1 else [_word(v) for v in use.values])
        )
        return Row(use, "key", (("sglang", flag, value),), note="SGLang pass-through, checked by the loader")
    if disp is not None:
        changes = disp.changes_experiment
        note = disp.reason
        if disp.kind == "fixed" and disp.value is not None and use.values:
            given = _word(use.values[0])
            if given != disp.value:
                changes = True
                note = f"{disp.reason}; this script asks for {use.values[0]}"
        if disp.kind == "always" and use.values and _word(use.values[0]) is False:
            changes = True
        return Row(use, disp.kind, note=note, changes_experiment=changes)
    return Row(use, "unsupported", note="miles has no key for this flag", changes_experiment=True)


ASYNC_NOTE = "rollout N+1 is generated while rollout N trains (one step off-policy)"
