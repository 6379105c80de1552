"""The tools a conversation may call, by name, and what one call returns to the model.

``calculator`` (arguments ``{"expression": str}``) is parsed arithmetic
(:mod:`miles.tools.calculator`); ``python`` (``{"code": str}``) runs the model's
program in the sandbox (:mod:`miles.tools.sandbox`) and answers with its
output. A call never raises: every failure is a :class:`ToolResult` with
``failed`` set and a text that tells the model what happened.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from miles.tools.calculator import CalculatorError, evaluate
from miles.tools.calls import ToolCall
from miles.tools.sandbox import SandboxLimits, run_python

SPECS: dict[str, dict[str, Any]] = {
    "calculator": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression exactly (+ - * / // % ** and parentheses).",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 4821 * 7395"}},
            "required": ["expression"],
        },
    },
    "python": {
        "name": "python",
        "description": "Run a Python program (no network, limited time and memory) and return what it prints.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string"}},
            "required": ["code"],
        },
    },
}
"""JSON schemas of the built-in tools, as chat templates take them (``tools=[...]``)."""

TOOL_NAMES = tuple(SPECS)


@dataclass(frozen=True)
class ToolResult:
    """What one call gives back: the tool message's text and how the call ended."""

    text: str
    failed: bool = False
    timed_out: bool = False


class Toolbox:
    """The tools of one run, each called with a model's arguments."""

    def __init__(self, names: list[str], limits: SandboxLimits) -> None:
        unknown = sorted(set(names) - set(SPECS))
        if unknown:
            raise ValueError(f"unknown tools {unknown}; built-in tools are {list(SPECS)}")
        self.names = list(names)
        self.limits = limits

    async def call(self, call: ToolCall) -> ToolResult:
        if call.error:
            return ToolResult(f"error: {call.error}", failed=True)
        if call.name not in self.names:
            return ToolResult(f"error: no tool {call.name!r}; the tools are {self.names}", failed=True)
        if call.name == "calculator":
            return self._calculator(call.arguments)
        return await asyncio.to_thread(self._python, call.arguments)

    @staticmethod
    def _calculator(args: dict[str, Any]) -> ToolResult:
        expression = args.get("expression")
        if not isinstance(expression, str):
            return ToolResult('error: calculator takes {"expression": "<arithmetic>"}', failed=True)
        try:
            return ToolResult(evaluate(expression))
        except CalculatorError as e:
            return ToolResult(f"error: {e}", failed=True)

    def _python(self, args: dict[str, Any]) -> ToolResult:
        code = args.get("code")
        if not isinstance(code, str):
            return ToolResult('error: python takes {"code": "<program>"}', failed=True)
        res = run_python(code, self.limits)
        if res.no_network_namespace:
            return ToolResult(
                "error: the sandbox could not isolate the network (the kernel refused unshare(CLONE_NEWNET)); "
                "the code did not run",
                failed=True,
            )
        if res.timed_out:
            return ToolResult(f"error: killed after {self.limits.timeout_s:g} s", failed=True, timed_out=True)
        if res.returncode != 0:
            last = res.stderr.strip().splitlines()[-1:] or [f"exit status {res.returncode}"]
            return ToolResult(f"error: {last[0]}", failed=True)
        return ToolResult(res.stdout.rstrip("\n"))
