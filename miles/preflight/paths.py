"""Whether a path of the run spec can be checked from this machine.

``miles submit`` runs on a login node, and some paths of a spec exist only on
the compute nodes (a node-local scratch disk, a file system the login node does
not mount). Such a path cannot be told apart from a typo by looking at the file
alone, so the rule looks at its top-level directory: when ``/scratch`` of
``/scratch/data/train.jsonl`` does not exist here, the whole tree belongs to
another machine and the check is skipped with a note; when ``/scratch`` exists
but the file does not, it is a mistake. ``miles run`` runs here, so for it
every path must exist.

Relative paths count from the directory miles is started in, as everywhere in
a spec (the job runs from the submit directory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class Seen:
    """What this machine knows of a path: ``here`` (it exists), ``elsewhere`` or ``missing`` (with why)."""

    kind: Literal["here", "elsewhere", "missing"]
    why: str = ""


def look(path: str, local_only: bool) -> Seen:
    """Classify ``path``; ``local_only`` (``miles run``) makes every absent path ``missing``."""
    p = Path(path)  # as the run reads it: no ~ or $VAR expansion
    if p.exists():
        return Seen("here")
    if not p.is_absolute():
        p = Path.cwd() / p
    top = Path(*p.parts[:2]) if len(p.parts) > 1 else p
    if not local_only and p.is_absolute() and not top.exists():
        return Seen(
            "elsewhere",
            f"{top} does not exist on this machine, so {path} is taken to be a path of the "
            "compute nodes and not checked here",
        )
    nearest = next((a for a in p.parents if a.exists()), None)
    where = f" (the nearest existing directory is {nearest})" if nearest is not None and nearest != Path("/") else ""
    return Seen(
        "missing",
        f"no such file or directory{where}; relative paths count from the directory miles is started in ({Path.cwd()})",
    )
