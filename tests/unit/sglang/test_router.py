"""sglang-router without SGLang: its command line, the refusal when it is not installed, the liveness probe.

The router itself (worker list, routing, an engine killed behind it) is tested
against the real sglang-router and SGLang server in ``tests/sglang/test_sglang_server.py``.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from miles.errors import UserError
from miles.plan.engine_argv import KEY_FROM_ENV
from miles.rollout.fleet import driver_router
from miles.sglang import router as sr
from miles.spec.tables import SglangConfig, Spec
from tests.sglang.sglang_servers import driver_task


def test_router_command() -> None:
    argv = sr.router_argv(
        ["http://a:1", "http://b:2"], host="0.0.0.0", port=30000, keyed=True, python="py", policy="round_robin"
    )
    assert argv == [
        "py",
        "-c",
        KEY_FROM_ENV,  # the key comes from the environment, inside the process
        "sglang_router.launch_router",
        "--host",
        "0.0.0.0",
        "--port",
        "30000",
        "--policy",
        "round_robin",
        "--log-level",
        "warn",
        "--shutdown-grace-period-secs",
        "5",
        "--worker-urls",
        "http://a:1",
        "http://b:2",
    ]
    launch = sr.router_launch(host="0.0.0.0", port=30000, api_key=None, log_dir=Path("/logs"), python="py")
    assert launch.argv[:3] == ("py", "-m", "sglang_router.launch_router")
    assert "--worker-urls" not in launch.argv and "--api-key" not in launch.argv  # workers come later, by miles
    policy = launch.argv.index("--policy")  # the default: a request's routing key keeps it on one engine
    assert launch.argv[policy : policy + 4] == ("--policy", "manual", "--assignment-mode", "min_group")
    assert launch.log_path == Path("/logs/router.log") and launch.url == "http://127.0.0.1:30000"
    assert not launch.own_session  # stops with the driver's process group


def test_router_port_is_the_plans(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MILES_ROUTER_PORT", raising=False)
    assert sr.router_port(driver_task(tmp_path, 1, master_port=24032)) == 24033  # base + 1, as in the plan
    monkeypatch.setenv("MILES_ROUTER_PORT", "25001")  # what the batch script exports
    assert sr.router_port(driver_task(tmp_path, 1)) == 25001


def test_use_router_without_the_router_installed_is_a_user_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """miles' own environment has no sglang-router: the run stops at once with what to do, before any engine work."""
    assert not sr.router_available(sys.executable)
    monkeypatch.setenv("MILES_SGLANG_PYTHON", sys.executable)
    spec = Spec(sglang=SglangConfig(use_router=True), source="run.toml")
    with pytest.raises(UserError) as err:
        driver_router(spec, driver_task(tmp_path, 1))
    text = str(err.value)
    assert "[sglang] use_router = true (run.toml)" in text and sys.executable in text
    assert f"pip install sglang-router=={sr.ROUTER_PIN}" in text and "use_router = false" in text


def test_port_open_tells_a_listening_port_from_a_closed_one() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        assert sr.port_open(url)
    assert not sr.port_open(url)
