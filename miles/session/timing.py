"""Wall-clock seconds per phase of one rollout, for ``perf.jsonl`` and the console line.

Each :meth:`PhaseTimer.lap` charges the time since the previous lap to a
phase, so the phases of a rollout add up to its wall time less what is spent
between them (metrics, checks), which ``miles bench loop`` reports as overhead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class PhaseTimer:
    started: float = field(default_factory=time.perf_counter)
    mark: float = field(default_factory=time.perf_counter)
    phases: dict[str, float] = field(default_factory=dict)

    def lap(self, name: str, since: float | None = None) -> None:
        """Charge the time since ``since`` (default: the previous lap) to ``time/<name>``."""
        now = time.perf_counter()
        key = f"time/{name}"
        self.phases[key] = self.phases.get(key, 0.0) + now - (self.mark if since is None else since)
        self.mark = now

    def total(self) -> float:
        return time.perf_counter() - self.started
