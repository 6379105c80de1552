"""Slurm host lists (``node[1-3,7],gpu-a[01-02]``) expanded in Python.

Ranks need the first host of their step's node list as the rendezvous address.
``scontrol show hostnames`` does this, but containers (pyxis, Apptainer) often
lack ``scontrol``, so the expansion is done here, without any Slurm binary.
"""

from __future__ import annotations

import re

from miles.errors import UserError

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?\Z")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise UserError(f"malformed Slurm node list {text!r}: unmatched ']'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise UserError(f"malformed Slurm node list {text!r}: unmatched '['")
    parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_one(item: str, whole: str) -> list[str]:
    start = item.find("[")
    if start < 0:
        return [item]
    end = item.index("]", start)
    prefix, body, rest = item[:start], item[start + 1 : end], item[end + 1 :]
    values: list[str] = []
    for rng in body.split(","):
        m = _RANGE.match(rng.strip())
        if not m:
            raise UserError(f"malformed Slurm node list {whole!r}: bad range {rng!r}")
        lo_s, hi_s = m.group(1), m.group(2) or m.group(1)
        width = len(lo_s)  # zero padding is kept: gpu[01-03] -> gpu01, gpu02, gpu03
        values.extend(f"{i:0{width}d}" for i in range(int(lo_s), int(hi_s) + 1))
    return [prefix + v + tail for v in values for tail in _expand_one(rest, whole)]


def expand_nodelist(text: str) -> list[str]:
    """All host names of a Slurm node list, in Slurm's order."""
    hosts: list[str] = []
    for item in _split_top_level(text.strip()):
        hosts.extend(_expand_one(item, text))
    return hosts


def first_host(text: str) -> str:
    """The first host of a Slurm node list (the rendezvous host of a step)."""
    hosts = expand_nodelist(text)
    if not hosts:
        raise UserError(f"empty Slurm node list {text!r}")
    return hosts[0]
