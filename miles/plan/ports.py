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

Which job id: the batch shell's ``SLURM_JOB_ID`` (the het leader's id), which
it exports as ``MILES_JOB_ID``. Inside ``srun --het-group=N`` Slurm versions
differ (22.05 gives the leader's id; other versions and docs the component's,
leader + N), so ranks must derive ports from ``MILES_JOB_ID``, or engines and
trainers could pick different blocks. The
script also exports the resolved ``MILES_MASTER_PORT``, ``MILES_WEIGHT_UPDATE_PORT``
(PP stage 0; stage s adds s) and ``MILES_ENGINE_PORT_BASE``.
"""

from __future__ import annotations

FLOOR = 20000
"""First port miles uses (above the well-known and most registered service ports)."""

CEILING = 32768
"""First port miles never uses: Linux's ephemeral range starts here."""

STRIDE = 64
"""Ports per job block."""

SLOTS = (CEILING - FLOOR) // STRIDE
"""Number of distinct blocks; job ids map onto them modulo this."""

MASTER_OFFSET = 0
ROUTER_OFFSET = 1
WEIGHT_UPDATE_OFFSET = 2


def block_base(job_id: int) -> int:
    """First port of the job's block."""
    return FLOOR + (job_id % SLOTS) * STRIDE


def engine_offset(pp: int) -> int:
    """Offset of engine slot 0's HTTP port: right after the weight-update ports."""
    return WEIGHT_UPDATE_OFFSET + pp


def ports_needed(pp: int, engines_per_node: int) -> int:
    """Size of the block a layout uses; must not exceed :data:`STRIDE`."""
    return engine_offset(pp) + 2 * engines_per_node


def shell_base_expr(job_id_var: str = "SLURM_JOB_ID") -> str:
    """The bash arithmetic that yields :func:`block_base` of ``$job_id_var``."""
    return f"$(( {FLOOR} + ({job_id_var} % {SLOTS}) * {STRIDE} ))"
