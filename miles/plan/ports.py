"""Job-id-derived TCP ports, computed the same way in Python and in the batch shell.

Why derived and not random: every rank of a job must agree on the ports without
talking to each other first, and two jobs sharing a node should rarely collide.
Why below 32768: Linux hands out ephemeral (outgoing) ports from
32768-60999 by default, so a fixed port in that range can be taken by some
unrelated outgoing connection at the wrong moment.

Each job gets a block of :data:`STRIDE` ports starting at
``FLOOR + (job_id % SLOTS) * STRIDE``. Inside the block:

======================  =================================================
offset                  use
======================  =================================================
0                       trainers' ``MASTER_PORT``
1                       sglang-router
2 .. 2+PP-1             weight-update group of each PP stage
2+PP + 2*i, +1          engine ``i`` on its node: HTTP port, NCCL port
======================  =================================================

The batch shell computes the same base with :func:`shell_base_expr`; a unit
test runs the rendered script and checks that both agree.

A site whose firewall or other services need another range sets
``MILES_PORT_RANGE=FIRST-LAST`` (inclusive) where miles plans (the login node's
environment); the rendered script exports the range it was planned with, so
every rank derives its ports from the same one.

Which job id: the batch shell's ``SLURM_JOB_ID`` (the het leader's id), which
it exports as ``MILES_JOB_ID``. Inside ``srun --het-group=N`` Slurm versions
differ (22.05 gives the leader's id; other versions and docs the component's,
leader + N), so ranks must derive ports from ``MILES_JOB_ID``, or engines and
trainers could pick different blocks. The
script also exports the resolved ``MILES_MASTER_PORT``, ``MILES_WEIGHT_UPDATE_PORT``
(PP stage 0; stage s adds s) and ``MILES_ENGINE_PORT_BASE``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from miles.errors import UserError

FLOOR = 20000
"""First port miles uses (above the well-known and most registered service ports)."""

CEILING = 32768
"""First port miles never uses: Linux's ephemeral range starts here."""

STRIDE = 64
"""Ports per job block."""

SLOTS = (CEILING - FLOOR) // STRIDE
"""Number of distinct blocks of the default range; job ids map onto them modulo this."""

RANGE_ENV = "MILES_PORT_RANGE"
"""A site's port range, ``FIRST-LAST`` inclusive; unset means ``FLOOR``-``CEILING - 1``."""


def port_range(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(first, end)`` of the ports miles may use (``end`` excluded): the site's ``MILES_PORT_RANGE`` or the
    default.
    """
    text = (os.environ if env is None else env).get(RANGE_ENV, "").strip()
    if not text:
        return FLOOR, CEILING
    first, sep, last = text.partition("-")
    if not (sep and first.strip().isdigit() and last.strip().isdigit()):
        raise UserError(f"{RANGE_ENV}={text!r}: expected FIRST-LAST, e.g. {RANGE_ENV}=20000-32767")
    lo, hi = int(first), int(last) + 1
    if lo < 1024 or hi > 65536 or hi - lo < STRIDE:
        raise UserError(
            f"{RANGE_ENV}={text!r}: the range must lie within 1024-65535 and hold at least one block "
            f"of {STRIDE} ports; e.g. {RANGE_ENV}=40000-47999"
        )
    return lo, hi


def slots(env: Mapping[str, str] | None = None) -> int:
    """Number of distinct port blocks in the range; job ids map onto them modulo this."""
    lo, hi = port_range(env)
    return (hi - lo) // STRIDE


MASTER_OFFSET = 0
ROUTER_OFFSET = 1
WEIGHT_UPDATE_OFFSET = 2


def block_base(job_id: int) -> int:
    """First port of the job's block."""
    return port_range()[0] + (job_id % slots()) * STRIDE


def engine_offset(pp: int) -> int:
    """Offset of engine slot 0's HTTP port: right after the weight-update ports."""
    return WEIGHT_UPDATE_OFFSET + pp


def ports_needed(pp: int, engines_per_node: int) -> int:
    """Size of the block a layout uses; must not exceed :data:`STRIDE`."""
    return engine_offset(pp) + 2 * engines_per_node


def shell_base_expr(job_id_var: str = "SLURM_JOB_ID") -> str:
    """The bash arithmetic that yields :func:`block_base` of ``$job_id_var``."""
    return f"$(( {port_range()[0]} + ({job_id_var} % {slots()}) * {STRIDE} ))"
