"""The job's engine key: engines and the router serve only those who present it.

Engines listen on every interface of their node; without a key anyone who can
reach a compute node could push weights into them (``/update_weights_from_tensor``,
``/update_weights_from_distributed``) or use them. So by default ``miles submit``
and ``miles run`` generate a random key per run directory, stored in
``run_dir/engine.key`` readable by its owner only (0600). Every task reads it
from there and passes it on in ``MILES_ENGINE_API_KEY``: the engines and the
router get it as SGLang's ``--api-key`` (every path but ``/health*``, ``/ready``
and ``/metrics`` then needs ``Authorization: Bearer <key>``), the driver sends it.
The key never appears in the batch script, and miles writes it into no log.

``[rollout] engine_auth = false`` turns this off for a trusted single-user
machine: the engines then accept every request.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import MutableMapping
from pathlib import Path
from typing import IO

from miles.errors import UserError
from miles.plan.engine_argv import KEY_ENV
from miles.spec.tables import Spec

KEY_FILE = "engine.key"
ENV = KEY_ENV  # the one name, beside the command lines it keeps the key out of
REDACTED = "<engine key>"


def ensure(run_dir: Path, spec: Spec) -> None:
    """Create the run directory's key (0600) when engines need one and it has none; an existing key is kept,
    so a run started again, or requeued, keeps its key."""
    if not spec.rollout.engine_auth:
        return
    path = run_dir / KEY_FILE
    if path.exists() and path.read_text().strip():
        os.chmod(path, 0o600)
        return
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")  # hex: a key starting with "-" would read as a flag


def load(run_dir: Path, spec: Spec) -> str | None:
    """The key the run's engines require, or None when ``[rollout] engine_auth = false``."""
    if not spec.rollout.engine_auth:
        return None
    try:
        key = (run_dir / KEY_FILE).read_text().strip()
    except FileNotFoundError:
        key = ""
    if not key:
        raise UserError(
            f"{run_dir / KEY_FILE} is missing or empty: the engines of this run need the key that "
            "`miles submit` and `miles run` write there; submit or run the spec again (or set "
            "[rollout] engine_auth = false on a trusted single-user machine)"
        )
    return key


def export(run_dir: Path, spec: Spec, environ: MutableMapping[str, str]) -> None:
    """Put the run's key into ``environ`` (``MILES_ENGINE_API_KEY``), or take any key out when auth is off."""
    key = load(run_dir, spec)
    if key is None:
        environ.pop(ENV, None)
    else:
        environ[ENV] = key


def redact(text: str, key: str | None) -> str:
    """``text`` with every occurrence of ``key`` replaced, for printing command lines and logs."""
    return text.replace(key, REDACTED) if key else text


def copy_redacted(stream: IO[bytes], path: Path, key: str) -> None:
    """Copy a server's output into its log file with the key taken out (SGLang logs its arguments, key and all).

    Runs until the server closes its output (it exited); meant for a daemon thread.
    """
    secret = key.encode()
    with open(path, "ab") as log:
        for line in iter(stream.readline, b""):
            log.write(line.replace(secret, REDACTED.encode()))
            log.flush()
    stream.close()
