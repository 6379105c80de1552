"""Finding tool calls in a model turn, in the formats model families are trained on.

* ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one JSON
  object (or a list of them) per tag pair; the format of the Hermes, Qwen2.5 and
  SmolLM2 chat templates.
* ``bare``: a turn that contains ``<tool_call>`` calls the environment's one tool;
  the text after the tag (up to ``</tool_call>`` or the end of the turn) is its
  argument, and an empty argument means the sample's ``metadata["tool_input"]``.
  For tiny character-level models that cannot write JSON yet: the scripted
  environment of the CPU example.

A call that is present but malformed is returned as a :class:`ToolCall` with
``error`` set, so the model gets a tool message saying what was wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

ParserName = Literal["hermes", "bare"]
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HERMES = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One call the model made."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    """Why the call could not be read (then ``name`` may be empty)."""


def parse_hermes(text: str) -> list[ToolCall]:
    calls: list[ToolCall] = []
    for body in _HERMES.findall(text):
        try:
            payload = json.loads(body.strip())
        except json.JSONDecodeError as e:
            calls.append(ToolCall("", error=f"the tool call is not JSON ({e.msg} at character {e.pos})"))
            continue
        for item in payload if isinstance(payload, list) else [payload]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                calls.append(ToolCall("", error='a tool call is {"name": ..., "arguments": {...}}'))
                continue
            args = item.get("arguments", {})
            if isinstance(args, str):  # some models write the arguments as a JSON string
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    args = None
            if not isinstance(args, dict):
                calls.append(ToolCall(item["name"], error="the arguments must be a JSON object"))
                continue
            calls.append(ToolCall(item["name"], args))
    return calls


def parse_bare(text: str, tool: str, argument: str, default: str) -> list[ToolCall]:
    if OPEN not in text:
        return []
    body = text.split(OPEN, 1)[1].split(CLOSE, 1)[0].strip()
    return [ToolCall(tool, {argument: body or default})]


def parse(parser: ParserName, text: str, *, tool: str = "", argument: str = "", default: str = "") -> list[ToolCall]:
    """The calls in one model turn (``tool``, ``argument``, ``default``: the ``bare`` format's one tool)."""
    if parser == "hermes":
        return parse_hermes(text)
    return parse_bare(text, tool, argument, default)
