"""Pre-flight: the run's inputs checked before anything is submitted, started or written.

``miles validate``, ``miles submit`` and ``miles run`` call :func:`preflight`
right after the spec loads. A bad input found only after the job starts costs
the queue wait and the engines' start-up; here it costs a second and exits 2
with every problem at once. What is checked (each by the rules its consumer
uses, never a copy of them):

* ``data``: prompt and evaluation files exist, are readable, and their first
  :data:`~miles.preflight.data.HEAD_ROWS` records parse and carry the input
  and label keys (``file:line`` in the message);
* ``model``: ``[model] hf_checkpoint`` has a config.json of an architecture the
  chosen trainer backend and rollout engine load, weights and a tokenizer;
* ``code``: the reward is built as the run builds it (custom functions
  imported, signatures checked), the dynamic-sampling filter imports, and
  ``wandb`` is installed when ``[run] use_wandb`` asks for W&B logging;
* ``resume``: a checkpoint the run would refuse to resume from (changed
  binding keys) is refused now.

Paths that exist only on the compute nodes are skipped with a note (see
:mod:`miles.preflight.paths`); ``--skip-check NAME`` skips a check outright.
Nothing here imports torch: this runs on login nodes.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Sequence
from typing import IO

from miles.preflight.code import check_code
from miles.preflight.data import check_data
from miles.preflight.model import check_model
from miles.preflight.report import PreflightError, Report
from miles.preflight.resume import check_resume
from miles.spec.tables import Spec

CHECKS = ("data", "model", "code", "resume")
"""Names accepted by ``--skip-check`` (plus ``all``)."""

__all__ = ["CHECKS", "PreflightError", "Report", "check", "preflight"]


def check(spec: Spec, local_only: bool, skip: Collection[str] = (), overrides: Sequence[str] = ()) -> Report:
    """Run every check not in ``skip``; ``local_only``: the run starts on this machine (``miles run``).

    ``overrides`` are the ``--set`` arguments the spec was loaded with, so that a problem
    with a value set there is reported at its ``--set``.
    """

    report = Report(spec.source, overrides)
    if "all" in skip:
        return report
    if "data" not in skip:
        check_data(spec, report, local_only)
    if "model" not in skip:
        check_model(spec, report, local_only)
    if "code" not in skip:
        check_code(spec, report)
    if "resume" not in skip:
        check_resume(spec, report, local_only)
    return report


def preflight(
    spec: Spec, command: str, skip: Collection[str] = (), overrides: Sequence[str] = (), err: IO[str] | None = None
) -> None:
    """The pre-flight of ``miles COMMAND``: print the notes, raise :class:`PreflightError` (exit 2) on problems."""
    report = check(spec, local_only=command in ("run", "eval"), skip=skip, overrides=overrides)
    out = err or sys.stderr
    for note in report.notes:
        print(f"miles {command}: note: {note}", file=out)
    if skip:
        print(f"miles {command}: note: skipped pre-flight checks: {', '.join(sorted(set(skip)))}", file=out)
    report.raise_if_any()
