"""Pre-flight of a resume: a checkpoint the run would refuse is refused before any process starts.

A run started on a directory that holds checkpoints resumes from the newest
one, and refuses (:func:`miles.ckpt.state.check_resumable`) when a binding spec
key changed since it was saved. The trainer applies that rule once the engines
have loaded; here the same rule reads the newest checkpoint's ``driver.json``
before anything starts. The checksums of the checkpoint's files are left to the
run (they can take minutes on a large model); every checkpoint of a directory
comes from the same run, so an older one the run might fall back to has the
same binding keys.
"""

from __future__ import annotations

import json
from pathlib import Path

from miles.ckpt.state import check_resumable
from miles.ckpt.store import CheckpointStore
from miles.errors import UserError
from miles.preflight.paths import look
from miles.preflight.report import Report
from miles.spec.tables import Spec


def check_resume(spec: Spec, report: Report, local_only: bool) -> None:
    """Check the checkpoint the run would resume from (``[ckpt] load``, else ``[ckpt] save``) against the spec."""
    key = ("ckpt", "load") if spec.ckpt.load else ("ckpt", "save")
    root = spec.ckpt.load or spec.ckpt.save
    if not root:
        return
    seen = look(root, local_only)
    if seen.kind == "elsewhere":
        if spec.ckpt.load:  # a save directory not visible here is the usual case of a first submission: no note
            report.note(f"ckpt.load: {seen.why}")
        return
    if seen.kind == "missing":
        if spec.ckpt.load:  # asked to resume from a directory that is not there: the run would silently start over
            report.problem(key, f"{root}: {seen.why}; fix the path, or remove [ckpt] load to start from the model")
        return
    for _, path in reversed(CheckpointStore(Path(root)).complete()):
        try:
            saved = json.loads((path / "driver.json").read_text(encoding="utf-8"))["spec"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an unreadable checkpoint is skipped by the run as well, which falls back to an older one
        try:
            check_resumable(saved, spec, str(path))
        except UserError as e:
            report.problem(key, str(e))
        return
