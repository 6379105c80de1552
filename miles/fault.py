"""Deliberate faults, for proving that a run interrupted anywhere resumes exactly.

Set ``MILES_FAULT`` to ``ACTION@PHASE:ROLLOUT`` (several separated by commas) and
trainer rank 0 injects the fault when it reaches that point of that rollout:

* ``preempt``: touch ``control/preempt``, as the batch shell's USR1/TERM trap does;
* ``term``: send this process SIGTERM shortly after, so it lands *inside* the phase
  (the rank's own handler then touches the flag, as under a real preemption);
* ``kill``: SIGKILL this process at once: a crash, or a node lost mid-save.

Phases: ``generate`` (the engines have answered, nothing trained), ``train`` (the
optimizer steps are running), ``sync`` (weights pushed to the engines), ``save``
(the actor's shards are written, the checkpoint is not yet sealed; ROLLOUT is then
the checkpoint's rollout id, the one a resume would start at).

Each fault fires once per run directory (a marker in ``control/`` remembers it),
so a resumed run goes past the point that stopped it. Without ``MILES_FAULT``
every call is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

TERM_DELAY_S = 0.05


def _faults() -> list[tuple[str, str, int]]:
    out = []
    for item in filter(None, (x.strip() for x in os.environ.get("MILES_FAULT", "").split(","))):
        action, _, where = item.partition("@")
        phase, _, rollout = where.partition(":")
        if action not in ("preempt", "term", "kill") or not rollout.isdigit():
            raise ValueError(f"MILES_FAULT item {item!r} is not ACTION@PHASE:ROLLOUT (actions: preempt, term, kill)")
        out.append((action, phase, int(rollout)))
    return out


def point(phase: str, rollout_id: int, run_dir: Path, rank: int) -> None:
    """Inject the configured fault if this is its phase and rollout (trainer rank 0 only)."""
    if rank != 0 or "MILES_FAULT" not in os.environ:
        return
    for action, at_phase, at_rollout in _faults():
        if (at_phase, at_rollout) != (phase, rollout_id):
            continue
        marker = run_dir / "control" / f"fault-{action}-{phase}-{rollout_id}"
        if marker.exists():
            continue
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        print(f"miles: injecting fault {action}@{phase}:{rollout_id}", flush=True)
        if action == "preempt":
            (run_dir / "control" / "preempt").touch()
        elif action == "term":
            threading.Timer(TERM_DELAY_S, os.kill, (os.getpid(), signal.SIGTERM)).start()
        else:
            os.kill(os.getpid(), signal.SIGKILL)
