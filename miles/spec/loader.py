"""Loading a run spec strictly: TOML file + ``--set`` overrides -> a checked, resolved :class:`Spec`.

The order is fixed, and every stage reports all its problems at once:

1. read and parse the file (a missing file or a TOML syntax error stops here);
2. apply ``--set table.key=value`` overrides to the parsed data (an inline-table
   value such as ``slurm.env={A="1"}`` merges into the spec's table;
   ``slurm.env:={A="1"}`` replaces it);
3. check every table and key: unknown ones (with the closest valid name), wrong
   types, values out of range, ``[sglang]`` pass-through flags;
4. derive the fourth batch knob (:mod:`miles.spec.knobs`) and check the
   cross-field rules (:mod:`miles.spec.rules`);
5. fill in the directories: ``run.run_dir`` defaults to ``runs/<name>`` and
   ``ckpt.save`` to ``<run_dir>/checkpoints``.

Relative *input* paths in a spec file (data, eval data, reward and filter
files, model and checkpoint directories) resolve from the directory of that
file and are recorded absolute (:mod:`miles.spec.paths`); a path given with
``--set`` resolves from the current directory. Outputs (``run.run_dir``,
``ckpt.save``, ``ckpt.save_hf``) stay relative to the directory miles is
started from, which keeps rendered scripts independent of where a checkout lives.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from miles.spec import knobs, rules
from miles.spec.fieldtypes import Mismatch, convert, given, range_violation, table_fields
from miles.spec.keylines import KeyLines
from miles.spec.miles_flags import unknown_key_hint
from miles.spec.passthrough import check_flag, load_flags
from miles.spec.paths import anchor_paths
from miles.spec.problems import Origin, Problem, Problems, SpecError
from miles.spec.tables import TABLES, Spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Locate = Callable[[tuple[str, ...]], Origin]

_NOT_KEYS = {("sglang", "server_args")}
"""Fields the loader fills itself; a spec may not set them."""


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> Spec:
    """Load the TOML run spec at ``path``, apply ``--set`` overrides, check everything, derive and resolve.

    Raises :class:`SpecError` (a :class:`~miles.errors.UserError`, exit code 2)
    listing every problem with ``file:line``, the ``[table] key``, what was
    expected, what was given, and the fix.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(
            [
                Problem(
                    Origin(source), "", "no such file; pass the path of a TOML run spec, e.g. configs/quickstart.toml"
                )
            ]
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([Problem(Origin(source), "", f"cannot read the run spec: {e}")]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        line = int(m.group(1)) if m else None
        raise SpecError([Problem(Origin(source, line), "", f"invalid TOML: {e}")]) from None
    lines = KeyLines(text)
    spec_dir = Path(path).absolute().parent
    return _build(raw, source, lambda p: Origin(source, lines.line_of(p)), overrides, spec_dir)


def spec_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> Spec:
    """Build a Spec from :func:`~miles.spec.writer.spec_to_dict`'s form (e.g. read from JSON), with the same checks."""
    raw = dict(data)
    source = raw.pop("source", "")
    if not isinstance(source, str):
        raise SpecError([Problem(Origin("<dict>"), "source", f"expected a string, got {given(source)}")])
    where = source or "<dict>"
    return _build(raw, source, lambda p: Origin(where), overrides)


def _field_type(table: str, parts: Sequence[str]) -> Any:
    cls = TABLES.get(table)
    if cls is None or not parts:
        return None
    fields = table_fields(cls)
    if parts[0] not in fields:
        return None
    tp = fields[parts[0]][0]
    if len(parts) == 2 and typing.get_origin(tp) is dict:
        return typing.get_args(tp)[1]
    return tp if len(parts) == 1 else None


def _wants_string(tp: Any) -> bool:
    """Whether a field holds text only (``str``, a Literal of strings, optionally ``| None``)."""
    origin = typing.get_origin(tp)
    parts = (
        [a for a in typing.get_args(tp) if a is not type(None)] if origin in (typing.Union, types.UnionType) else [tp]
    )
    return all(
        p is str or (typing.get_origin(p) is Literal and all(isinstance(a, str) for a in typing.get_args(p)))
        for p in parts
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``table.key=value`` into its key path and value; raise ValueError when it is not that shape.

    The value is read as a TOML value (``64``, ``true``, ``[1, 2]``, ``"x"``); a value
    that is not valid TOML is taken as a bare string (``--set run.name=exp1``), and so
    is any value given to a string key (``--set slurm.time=04:00:00``).
    """
    key, sep, value_text = text.partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or len(parts) < 2 or not all(parts):
        raise ValueError(text)
    value_text = value_text.strip()
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        return parts, value_text
    tp = _field_type(parts[0], parts[1:])
    if tp is not None and _wants_string(tp) and not isinstance(value, str):
        return parts, value_text
    return parts, value


def _apply_overrides(
    raw: dict[str, Any], overrides: Sequence[str], problems: Problems
) -> dict[tuple[str, ...], Origin]:
    set_origins: dict[tuple[str, ...], Origin] = {}
    for text in overrides:
        origin = Origin(f"--set {text}")
        key, sep, rest = text.partition("=")
        replace = bool(sep) and key.rstrip().endswith(":")  # TABLE.KEY:={...} replaces a whole table
        if replace:
            text = f"{key.rstrip()[:-1]}={rest}"
        try:
            parts, value = parse_override(text)
        except ValueError:
            problems.add(origin, "", "expected --set TABLE.KEY=VALUE, e.g. --set rollout.rollout_batch_size=64")
            continue
        target = raw
        for i, part in enumerate(parts[:-1]):
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                where = ".".join(parts[: i + 1])
                problems.add(origin, "", f"{where} is not a table, so {'.'.join(parts)} cannot be set")
                break
        else:
            old = target.get(parts[-1])
            if isinstance(value, dict) and isinstance(old, dict) and not replace:
                value = {**old, **value}  # an inline table merges into the spec's; `:=` replaces it
            target[parts[-1]] = value
            set_origins[tuple(parts)] = origin
    return set_origins


def _suggest(table: str, key: str, fields: list[str]) -> str:
    """The fix for an unknown key: the key with underscores, the miles key of a Miles or Megatron flag's name, the
    table the key belongs to, or a close spelling (close enough to be a typo, so never a key that means another
    thing: ``attention_dropout`` is not ``attention_backend``)."""
    if key.replace("-", "_") in fields:
        return f"; write {key.replace('-', '_')} (underscores where Miles' flags have dashes)"
    hint = unknown_key_hint(table, key)
    if hint:
        return f"; {hint}"
    elsewhere = [
        t for t, cls in TABLES.items() if t != table and key in table_fields(cls) and (t, key) not in _NOT_KEYS
    ]
    if elsewhere:
        return f"; {key} belongs in [{elsewhere[0]}]"
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.8)
    if close:
        return f"; did you mean {close[0]}?"
    return f"; the keys of [{table}] are listed in docs/spec.md"


def _check_table(
    name: str, values: dict[str, Any], origin_of: Callable[[tuple[str, ...]], Origin], problems: Problems
) -> dict[str, Any]:
    cls = TABLES[name]
    fields = table_fields(cls)
    keys = [k for k in fields if (name, k) not in _NOT_KEYS]
    kwargs: dict[str, Any] = {}
    server_args: dict[str, Any] = {}
    flags = load_flags() if name == "sglang" else None
    for key, value in values.items():
        origin, where = origin_of((name, key)), f"[{name}] {key}"
        if (name, key) in _NOT_KEYS:
            problems.add(
                origin,
                where,
                "is filled by miles from the other [sglang] keys: write SGLang flags directly "
                "as [sglang] keys, e.g. chunked_prefill_size = 4096",
            )
        elif key in fields:
            tp, f = fields[key]
            try:
                converted = convert(value, tp)
            except Mismatch as e:
                detail = f" ({e.detail})" if e.detail else ""
                problems.add(origin, where, f"expected {e.expected}, got {given(value)}{detail}")
                continue
            bad_range = range_violation(converted, f.metadata)
            if bad_range:
                problems.add(origin, where, f"{bad_range}, got {given(converted)}")
            else:
                kwargs[key] = converted
        elif name == "sglang":
            why = check_flag(key, value, flags)
            if why:
                hint = unknown_key_hint(name, key)
                problems.add(origin, where, f"{why}; {hint}" if hint else why)
            else:
                server_args[key] = copy.deepcopy(value)
        else:
            problems.add(origin, where, f"unknown key in [{name}]{_suggest(name, key, keys)}")
    if name == "sglang":
        kwargs["server_args"] = server_args
    return kwargs


def _build(
    raw: dict[str, Any], source: str, locate: Locate, overrides: Sequence[str], spec_dir: Path | None = None
) -> Spec:
    problems = Problems()
    raw = copy.deepcopy(raw)
    set_origins = _apply_overrides(raw, overrides, problems)

    def origin_of(path: tuple[str, ...]) -> Origin:
        best = max((p for p in set_origins if p[: len(path)] == path or path[: len(p)] == p), key=len, default=None)
        return set_origins[best] if best is not None else locate(path)

    tables: dict[str, Any] = {}
    for name, values in raw.items():
        if name in TABLES and isinstance(values, dict):
            tables[name] = TABLES[name](**_check_table(name, values, origin_of, problems))
        elif name in TABLES:
            problems.add(
                origin_of((name,)),
                f"[{name}]",
                f"must be a table ([{name}] followed by key = value lines), got {given(values)}",
            )
        elif not isinstance(values, dict):
            homes = [t for t, cls in TABLES.items() if name in table_fields(cls) and (t, name) not in _NOT_KEYS]
            flag = unknown_key_hint("", name)
            hint = f"; did you mean [{homes[0]}] {name}?" if homes else (f"; {flag}" if flag else "")
            problems.add(origin_of((name,)), name, f"keys belong inside a table such as [run]{hint}")
        else:
            close = difflib.get_close_matches(name, list(TABLES), n=1, cutoff=0.5)
            hint = f"did you mean [{close[0]}]?" if close else "the tables are " + ", ".join(f"[{t}]" for t in TABLES)
            problems.add(origin_of((name,)), f"[{name}]", f"unknown table; {hint}")
    problems.raise_if_any()
    spec = _infer_mode(Spec(**tables, source=source), raw)

    def report(table: str, key: str, message: str) -> None:
        path = (table, key) if key else (table,)
        problems.add(origin_of(path), f"[{table}] {key}" if key else f"[{table}]", message)

    given_knobs = {k: getattr(getattr(spec, knobs.TABLE_OF[k]), k) for k in knobs.KNOBS}
    resolved, knob_problems = knobs.resolve(given_knobs)
    for kp in knob_problems:
        report(knobs.TABLE_OF[kp.knob], kp.knob, kp.message)
    if resolved:
        spec = dataclasses.replace(
            spec,
            rollout=dataclasses.replace(
                spec.rollout, rollout_batch_size=resolved[knobs.R], n_samples_per_prompt=resolved[knobs.N]
            ),
            train=dataclasses.replace(
                spec.train, global_batch_size=resolved[knobs.G], num_steps_per_rollout=resolved[knobs.S]
            ),
        )
    rules.check(spec, report)
    problems.raise_if_any()
    if spec_dir is not None:
        cwd = Path.cwd()

        def anchor(path: tuple[str, ...]) -> Path:
            given_by_set = any(p[: len(path)] == path or path[: len(p)] == p for p in set_origins)
            return cwd if given_by_set else spec_dir

        spec = anchor_paths(spec, anchor)
    run_dir = spec.run.run_dir or f"runs/{spec.run.name}"
    save = spec.ckpt.save or f"{run_dir.rstrip('/')}/checkpoints"
    return dataclasses.replace(
        spec, run=dataclasses.replace(spec.run, run_dir=run_dir), ckpt=dataclasses.replace(spec.ckpt, save=save)
    )


def _infer_mode(spec: Spec, raw: Mapping[str, Any]) -> Spec:
    """``[cluster] mode`` left out: Miles runs the engines on GPUs of their own unless ``--colocate`` is given, and
    names them with ``--rollout-num-gpus``; so a spec that sizes the engines is split, one that does not is colocated.
    The choice is recorded in ``spec.notes`` so that validate and plan say it."""
    cluster = raw.get("cluster")
    if isinstance(cluster, dict) and "mode" in cluster:
        return spec
    c = spec.cluster
    sized = [k for k in ("rollout_num_gpus", "rollout_num_nodes") if getattr(c, k) is not None]
    mode: Literal["colocate", "split"]
    if sized:
        mode = "split"
        why = f"[cluster] {sized[0]} gives the engines GPUs of their own, as Miles does without --colocate"
    else:
        mode = "colocate"
        why = (
            "no [cluster] rollout_num_gpus / rollout_num_nodes names GPUs for the engines, so they share the trainers'"
        )
    note = f'[cluster] mode not set: planned as "{mode}" because {why}; set mode to make the choice explicit'
    return dataclasses.replace(spec, cluster=dataclasses.replace(c, mode=mode), notes=(*spec.notes, note))
