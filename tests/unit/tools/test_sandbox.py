"""The sandbox holds model-written code to its limits: time, memory, no network; failures become tool messages."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from miles.tools.calculator import CalculatorError, evaluate
from miles.tools.calls import parse
from miles.tools.sandbox import SandboxLimits, run_python
from miles.tools.toolbox import Toolbox

LIMITS = SandboxLimits(timeout_s=2.0, memory_mb=256)


def test_code_runs_and_prints() -> None:
    res = run_python("print(sum(range(10)))", LIMITS)
    assert res.ok and res.stdout == "45\n"


def test_a_hanging_program_is_killed_at_the_time_limit() -> None:
    t0 = time.monotonic()
    res = run_python("import os\nos.fork()\nwhile True:\n    pass\n", LIMITS)
    assert res.timed_out and not res.ok
    assert time.monotonic() - t0 < LIMITS.timeout_s + 3.0


def test_memory_past_the_limit_fails_inside_the_child() -> None:
    res = run_python("x = bytearray(600 * 1024 * 1024)\nprint('allocated')", LIMITS)
    assert not res.ok and "MemoryError" in res.stderr and "allocated" not in res.stdout


def test_the_network_is_unreachable_even_to_a_listening_local_port() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
        res = run_python(code, LIMITS)
    if res.no_network_namespace:
        pytest.fail("the kernel refused a network namespace: the sandbox cannot isolate tools on this machine")
    assert not res.ok and "connected" not in res.stdout
    assert "Network is unreachable" in res.stderr or "Connection refused" in res.stderr


def test_tool_failures_are_messages_not_exceptions() -> None:
    box = Toolbox(["calculator", "python"], SandboxLimits(timeout_s=1.0, memory_mb=256))

    def call(text: str):  # type: ignore[no-untyped-def]
        (c,) = parse("hermes", text)
        return asyncio.run(box.call(c))

    assert call('<tool_call>{"name": "calculator", "arguments": {"expression": "4821 * 7395"}}</tool_call>').text == (
        "35651295"
    )
    hang = call('<tool_call>{"name": "python", "arguments": {"code": "while True: pass"}}</tool_call>')
    assert hang.failed and hang.timed_out and "killed after 1 s" in hang.text
    crash = call('<tool_call>{"name": "python", "arguments": {"code": "1/0"}}</tool_call>')
    assert crash.failed and not crash.timed_out and "ZeroDivisionError" in crash.text
    assert "not JSON" in call("<tool_call>{calculator: 1+1}</tool_call>").text
    assert "no tool 'search'" in call('<tool_call>{"name": "search", "arguments": {}}</tool_call>').text
    assert call('<tool_call>{"name": "calculator", "arguments": {"expression": "9**9**9"}}</tool_call>').failed


def test_the_calculator_is_exact_and_bounded() -> None:
    assert evaluate("(12 + 3) * 4 - 5 // 2") == "58"
    assert evaluate("7 / 4") == "1.75"
    assert evaluate("2 ** 10 % 1000") == "24"
    for bad in ("__import__('os')", "9**9**9", "1/0", "", "x + 1"):
        with pytest.raises(CalculatorError):
            evaluate(bad)
