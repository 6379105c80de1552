"""Weights & Biases as one more sink of a run's metrics (``[run] use_wandb``), beside metrics.jsonl and TensorBoard.

The driver opens one W&B run per life of the miles run (a first start, each requeue, each resume) and logs to
it exactly what goes to TensorBoard: a rollout's metrics and perf figures against ``rollout_id``, an
evaluation's figures against ``eval_step``; the resolved spec is the W&B run's config.

One miles run is one W&B run: its id is made once and kept in ``<run_dir>/wandb-run-id``, and every life
opens W&B with that id and ``resume="allow"``, so a preempted and requeued job continues the same W&B run
instead of starting another. The x axes are the logged ``rollout_id`` and ``eval_step`` figures
(``define_metric``), not W&B's own step, which only counts ``log`` calls: W&B drops a row whose step is
below one it already holds, and a resume redoes the rollouts after the last checkpoint. A redone rollout
is logged again with the same metrics (exact resume), at the same ``rollout_id``.

Offline mode (the default: compute nodes rarely reach the internet) writes W&B's files under
``<run_dir>/wandb``, one folder per life; the driver prints the ``wandb sync`` command that uploads all of
them as the one run when the life ends. ``wandb`` is an optional package, imported only here and only
when the spec asks for W&B.
"""

from __future__ import annotations

import secrets
import shlex
import string
from pathlib import Path
from typing import Any

from miles.errors import UserError
from miles.job.rundir import WANDB_RUN_ID, write_atomic
from miles.preflight.code import WANDB_INSTALL
from miles.spec.tables import Spec
from miles.spec.writer import spec_to_dict

ID_ALPHABET = string.ascii_lowercase + string.digits
"""Characters of a W&B run id miles makes: those of the ids W&B makes itself."""


def run_id(run_dir: Path) -> str:
    """The W&B run id of the miles run in ``run_dir``: the one a previous life kept, or a new one, kept now."""
    path = run_dir / WANDB_RUN_ID
    if path.exists():
        kept = path.read_text().strip()
        if kept:
            return kept
    made = "".join(secrets.choice(ID_ALPHABET) for _ in range(12))
    write_atomic(path, made + "\n")
    return made


def init_arguments(spec: Spec, run_dir: Path, wandb_id: str) -> dict[str, Any]:
    """The keyword arguments of ``wandb.init`` for one life of the run: who it is, where it goes, its config."""
    run = spec.run
    return {
        "id": wandb_id,
        "resume": "allow",
        "mode": run.wandb_mode,
        "dir": str(run_dir),
        "project": run.wandb_project or None,
        "entity": run.wandb_team or None,
        "group": run.wandb_group or None,
        "name": run.name,
        "tags": list(run.wandb_tags),
        "config": spec_to_dict(spec),
        "allow_val_change": True,  # a resume may change keys that do not bind the checkpoint (num_rollout)
        "settings": {"console": "off"},  # the run's console output stays in its own logs
    }


def sync_command(run_dir: Path, wandb_id: str) -> str:
    """The shell command that uploads every offline life of the W&B run ``wandb_id`` (W&B's folder names)."""
    return f"wandb sync {shlex.quote(str(run_dir / 'wandb'))}/offline-run-*-{wandb_id}"


class WandbSink:
    """One life's W&B run; create it on the driver only, through :meth:`open`."""

    def __init__(self, run: Any, run_dir: Path, mode: str) -> None:
        self._run = run
        self.run_dir = run_dir
        self.mode = mode
        self.id: str = run.id
        self._axes: dict[str, str] = {}
        """Figure -> the figure W&B draws it against (``rollout_id`` or ``eval_step``), as defined so far."""

    @classmethod
    def open(cls, spec: Spec, run_dir: Path) -> WandbSink:
        """Start (or resume) the run directory's W&B run; refuses with the install command without ``wandb``."""
        try:
            import wandb
        except ImportError as e:
            raise UserError(f"[run] use_wandb is set but the wandb package is not installed: {WANDB_INSTALL}") from e
        run = wandb.init(**init_arguments(spec, run_dir, run_id(run_dir)))
        return cls(run, run_dir, spec.run.wandb_mode)

    def log_rollout(self, rollout_id: int, values: dict[str, float]) -> None:
        """Log one rollout's metrics and perf figures, drawn against ``rollout_id``."""
        self._log("rollout_id", rollout_id, values)

    def log_eval(self, step: int, values: dict[str, float]) -> None:
        """Log one evaluation's figures, drawn against ``eval_step`` (rollouts trained into the weights)."""
        self._log("eval_step", step, values)

    def _log(self, axis: str, at: int, values: dict[str, float]) -> None:
        for key in values:
            if key not in self._axes:
                self._run.define_metric(key, step_metric=axis)
                self._axes[key] = axis
        self._run.log({axis: at, **values})

    def close(self) -> None:
        """Finish this life's W&B run and wait until W&B's service has written everything (its exit hook does not
        run in every launcher's processes); offline, print the command that uploads the whole run."""
        import wandb

        self._run.finish()
        wandb.teardown()
        if self.mode == "offline":
            print(
                f"miles: W&B run {self.id} is saved offline in {self.run_dir / 'wandb'}; upload it from a machine "
                f"with internet access: {sync_command(self.run_dir, self.id)}",
                flush=True,
            )
