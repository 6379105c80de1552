"""``miles run``'s console: the failing rank's error first and whole, the ranks that followed it kept to their logs."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from pathlib import Path

from miles.launch.console import Console


def _rank(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(name: str) -> str:
    return f"import os, time\nwhile not os.path.exists({name!r}): time.sleep(0.02)\n"


CAUSE = """
import traceback
print("step 1 done", flush=True)
{wait_follower}
try:
    raise ValueError("the loss is NaN")
except ValueError:
    traceback.print_exc()
    print("miles task trainer 0 (pid 1) on n1 FAILED: ValueError: the loss is NaN", flush=True)
open({failed!r}, "w").close()
"""

FOLLOWER = """
import traceback
print("step 1 done", flush=True)
open({started!r}, "w").close()
{wait_cause}
try:
    raise RuntimeError("Connection reset by peer")
except RuntimeError:
    traceback.print_exc()
    print("miles task trainer 1 (pid 2) on n1 FAILED: RuntimeError: Connection reset by peer", flush=True)
"""

SURVIVOR = """
import traceback
try:
    raise KeyError("a retried request")
except KeyError:
    traceback.print_exc()
print("retrying; all is well", flush=True)
"""


def _pump_all(console: Console, ranks: dict[str, subprocess.Popen[bytes]]) -> None:
    threads = [threading.Thread(target=console.pump, args=(name, p.stdout)) for name, p in ranks.items()]
    for t in threads:
        t.start()
    for p in ranks.values():
        p.wait()
    for t in threads:
        t.join(timeout=10)


def test_the_cause_is_printed_whole_and_the_followers_tracebacks_only_logged(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console(out, tmp_path)
    started, failed = str(tmp_path / "started"), str(tmp_path / "failed")
    cause = CAUSE.format(wait_follower=_wait_for(started), failed=failed)
    follower = FOLLOWER.format(started=started, wait_cause=_wait_for(failed) + "time.sleep(0.3)")
    _pump_all(console, {"trainer 0": _rank(cause), "trainer 1": _rank(follower)})
    text = out.getvalue()
    assert console.cause == "trainer 0" and console.muted == {"trainer 1"}
    assert "trainer 0 | ValueError: the loss is NaN" in text and "trainer 0 | Traceback" in text
    assert "Connection reset" not in text
    follower_log = (tmp_path / "trainer-1.out").read_text()
    assert "Traceback (most recent call last):" in follower_log and "Connection reset by peer" in follower_log


def test_a_traceback_a_rank_survives_is_printed_and_blames_nobody(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console(out, tmp_path)
    _pump_all(console, {"engine 0": _rank(SURVIVOR)})
    lines = out.getvalue().splitlines()
    assert console.cause is None
    assert lines[0] == "engine 0 | Traceback (most recent call last):"
    assert lines[-1] == "engine 0 | retrying; all is well" and "engine 0 | KeyError: 'a retried request'" in lines


def test_a_rank_killed_without_a_word_is_the_cause_of_its_peers_report(tmp_path: Path) -> None:
    killed = subprocess.Popen(["sleep", "600"])
    killed.kill()
    killed.wait()
    out = io.StringIO()
    console = Console(out, tmp_path)
    console.failed_ranks = lambda: ["trainer 0"] if killed.poll() else []
    _pump_all(console, {"trainer 1": _rank(FOLLOWER.format(started=str(tmp_path / "started"), wait_cause=""))})
    assert console.cause == "trainer 0" and "Connection reset" not in out.getvalue()
