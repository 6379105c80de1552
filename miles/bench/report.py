"""How a benchmark reports: one :class:`Report` printed as a table, written as JSON, plotted.

A figure without its context is useless a week later, so every report carries
the machine (host, CPU count and load, device name, torch version), the UTC
time, the exact command line and the settings next to the rows.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miles.bench.hardware import device_name


def machine(device: str) -> dict[str, Any]:
    """Where the figures were measured (load average included: a loaded machine gives noisy figures)."""
    import torch

    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
    }
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if torch.device(device).type == "cuda":
        info["cuda"] = torch.version.cuda
        info["gpus"] = torch.cuda.device_count()
    return info


@dataclass
class Report:
    """A benchmark's result: settings, rows of figures, summary and notes."""

    suite: str
    settings: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    command: str = field(
        default_factory=lambda: (
            " ".join(["miles", "bench", *sys.argv[2:]])
            if len(sys.argv) > 1 and sys.argv[1] == "bench"
            else " ".join(sys.argv)
        )
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "date": self.date,
            "command": self.command,
            "machine": self.machine,
            "settings": self.settings,
            "rows": self.rows,
            "summary": self.summary,
            "notes": self.notes,
        }

    def write_json(self, path: str | Path) -> Path:
        """Write the report atomically (temp name, rename)."""
        return write_atomic(Path(path), json.dumps(self.to_dict(), indent=2, default=str) + "\n")

    def print(self, columns: list[str] | None = None) -> None:
        """The rows as a rich table, then the summary and notes."""
        from rich.console import Console
        from rich.table import Table

        console = Console(width=None if sys.stdout.isatty() else 160)
        title = f"miles bench {self.suite} - {self.machine.get('device_name', '?')} - {self.date}"
        table = Table(title=title)
        cols = columns or list(dict.fromkeys(k for r in self.rows for k in r))
        for c in cols:
            table.add_column(c, justify="left" if c in ("name", "what", "phase", "engine") else "right")
        for r in self.rows:
            table.add_row(*(fmt(r.get(c)) for c in cols))
        console.print(table)
        for k, v in self.summary.items():
            console.print(f"  {k}: {fmt(v)}")
        for n in self.notes:
            console.print(f"  note: {n}")


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e5:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return str(v)


def write_atomic(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def plot_sync(report: Report, path: str | Path) -> Path:
    """PNG of sync GB/s and raw-broadcast GB/s against bucket size (log2 x axis), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(report.rows, key=lambda r: r["bucket_mb"])
    x = [r["bucket_mb"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.plot(x, [r["sync_gb_s"] for r in rows], "o-", label="miles sync")
    ax.plot(x, [r["raw_gb_s"] for r in rows], "s--", label="raw dist.broadcast")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bucket size (MiB)")
    ax.set_ylabel("GB/s")
    gib = report.summary.get("weights_gib", 0.0)
    ax.set_title(
        f"weight sync, {gib:.2f} GiB, {report.settings.get('backend')} - {report.machine.get('device_name')}",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, target)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return target
