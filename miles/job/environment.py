"""Who am I? A rank's role and torch.distributed settings, from its environment.

Every process miles starts (trainer rank or engine) runs ``miles.launch.task``,
which calls :func:`task_context` first. The answer depends only on the
environment mapping and the plan, so it is a pure function and is unit-tested
with plain dicts. Three launchers are understood, tried in this order:

* **Slurm** (``srun``): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
  ``SLURM_NODEID``, ``SLURM_STEP_NODELIST`` and, in heterogeneous jobs,
  ``SLURM_JOB_NODELIST_HET_GROUP_<n>``. ``SLURM_HET_JOB_ID`` is *not* set inside
  jobs, and no variable names a task's component, so the component comes from the
  plan (engines in component 0, trainers in component 1) and, for one step
  spanning both (``srun --het-group=0,1``), from the rank: engines first.
* **torchrun style** (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``): what ``miles run`` (the local launcher) sets.
* **MPI** (``mpirun`` inside an allocation): ``OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK``
  (Open MPI) or ``PMI_RANK/PMI_SIZE/MPI_LOCALRANKID`` (MPICH, Intel MPI). MPI does
  not say where rank 0 runs; the caller may pass ``rank0_host`` (from an mpi4py
  broadcast) and otherwise the first host of the Slurm allocation is used.

Explicit ``MILES_*`` variables (exported by the batch script or the local
launcher) win over everything derived, so a site with an odd network can pin the
rendezvous (``MILES_MASTER_ADDR``) without changing code.

This module must not import torch: the caller says whether CUDA is available.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from miles.errors import UserError
from miles.job.nodelist import first_host
from miles.plan import ports

Role = Literal["trainer", "engine"]
Launcher = Literal["slurm", "torchrun", "mpi"]


@dataclass(frozen=True, slots=True)
class Layout:
    """The part of the plan a rank needs: counts, components and ports.

    Read from ``plan.json`` (:class:`miles.plan.model.Plan` as JSON) by
    :meth:`from_plan`; the local launcher and the tests may build it directly.
    """

    mode: Literal["colocate", "split"]
    trainer_world_size: int
    num_engines: int
    master_port: int
    weight_update_port: int
    engine_http_ports: tuple[int, ...]
    """HTTP port of each engine, by engine index."""
    engine_tp: int = 1
    engine_rank_offsets: tuple[int, ...] = ()
    """Weight-update group rank of each engine's first GPU; empty means ``1 + i * engine_tp``."""
    engine_het_group: int | None = None
    trainer_het_group: int | None = None
    job_id: int | None = None
    """Job id the ports were derived for (None: placeholder ports)."""
    engine_nccl_ports: tuple[int, ...] = ()
    """SGLang's internal ``--nccl-port`` of each engine."""
    engine_gpus: tuple[tuple[int, ...], ...] = ()
    """GPU ids (on its node) of each engine."""

    @classmethod
    def from_plan(cls, plan: Mapping[str, Any]) -> Layout:
        """Extract the layout from the plan dict (``plan.json``, ``miles plan --json``)."""
        try:
            mode = plan["mode"]
            plan_ports = plan["ports"]
            groups = plan.get("weight_update_groups") or []
            split = mode == "split"
            return cls(
                mode=mode,
                trainer_world_size=int(plan["mesh"]["world_size"]),
                num_engines=len(plan["engines"]),
                master_port=int(plan_ports["master"]),
                weight_update_port=int(groups[0]["port"] if groups else plan_ports["weight_update"][0]),
                engine_http_ports=tuple(int(p) for p in plan_ports["engine_http"]),
                engine_tp=int(plan.get("engine_tp", 1)),
                engine_rank_offsets=tuple(int(o) for o in groups[0]["engine_rank_offsets"]) if groups else (),
                engine_het_group=int(plan["engine_het_group"]) if split else None,
                trainer_het_group=int(plan["trainer_het_group"]) if split else None,
                job_id=plan_ports.get("job_id"),
                engine_nccl_ports=tuple(int(p) for p in plan_ports.get("engine_nccl") or ()),
                engine_gpus=tuple(tuple(int(g) for g in e.get("gpus", ())) for e in plan["engines"]),
            )
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise UserError(
                f"plan.json does not look like a miles plan (missing or bad {e}); "
                "re-run `miles submit` to write a current one"
            ) from e

    def for_job(self, job_id: int) -> Layout:
        """The same layout with its ports moved to ``job_id``'s block.

        ``plan.json`` is written before Slurm assigns the job id, so its ports are
        those of a placeholder id; every port is an offset inside the job's block
        (:mod:`miles.plan.ports`), so moving the block is all it takes.
        """
        if self.job_id == job_id:
            return self
        shift = ports.block_base(job_id) - ports.block_base(self.job_id or 0)
        return replace(
            self,
            master_port=self.master_port + shift,
            weight_update_port=self.weight_update_port + shift,
            engine_http_ports=tuple(p + shift for p in self.engine_http_ports),
            engine_nccl_ports=tuple(p + shift for p in self.engine_nccl_ports),
            job_id=job_id,
        )


@dataclass(frozen=True, slots=True)
class TaskContext:
    """Everything one rank needs to join its worlds."""

    role: Role
    rank: int
    """Rank in the trainer world (trainers) or the engine index (engines)."""
    world_size: int
    """Trainer world size (trainers) or number of engines (engines)."""
    local_rank: int
    node_index: int
    node_name: str
    het_group: int | None
    engine_index: int | None
    num_engines: int
    master_addr: str
    """Rendezvous of the trainer world: the host of trainer rank 0."""
    master_port: int
    weight_update_addr: str
    """Rendezvous of the weight-update group (trainer rank 0 plus every engine rank)."""
    weight_update_port: int
    weight_update_world_size: int
    weight_update_rank: int | None
    """0 for trainer rank 0, ``1 + engine_index * engine_tp`` for engines, None for other trainers."""
    engine_host: str
    engine_port: int | None
    """HTTP port this engine serves on (engines only)."""
    engine_nccl_port: int | None
    """SGLang's internal NCCL port of this engine (engines only; None when the plan has none)."""
    engine_gpus: tuple[int, ...]
    """GPU ids on the node of this engine, from the plan (engines only; empty for trainers)."""
    device: Literal["cuda", "cpu"]
    backend: Literal["nccl", "gloo"]
    run_dir: Path
    job_id: str | None
    restart_count: int
    launcher: Launcher
    launch_id: str
    """Identifies this launch (job id + restart count, or the local launcher's id): engine
    announcements of an earlier launch in the same run directory are ignored."""

    @property
    def is_driver(self) -> bool:
        """Trainer rank 0 drives the loop: waits for engines, syncs weights, writes metrics."""
        return self.role == "trainer" and self.rank == 0

    @property
    def name(self) -> str:
        """A short, log-friendly name: ``trainer 3`` or ``engine 1``."""
        return f"{self.role} {self.rank}"


def _opt_int(v: object) -> int | None:
    return None if v is None else int(v)  # type: ignore[call-overload]


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as e:
        raise UserError(f"environment variable {key}={env[key]!r} is not an integer") from e


def detect_launcher(env: Mapping[str, str]) -> Launcher:
    """Which launcher started this process; torchrun-style variables win over Slurm's.

    The local launcher and ``torchrun`` inside an allocation set ``RANK`` while
    Slurm's variables are still there (of the batch step): ``RANK`` is the truth.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        return "mpi"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return "slurm"
    raise UserError(
        "cannot tell this process's rank: none of RANK/WORLD_SIZE (torchrun, `miles run`), "
        "SLURM_PROCID/SLURM_NTASKS in a job step (srun) or OMPI_COMM_WORLD_RANK/PMI_RANK (mpirun) is set. "
        "Start ranks with `miles run`, `miles submit`, srun or mpirun."
    )


def _launcher_ranks(env: Mapping[str, str], launcher: Launcher) -> tuple[int, int, int]:
    """(rank, size, local rank) as the launcher numbers them."""
    if launcher == "torchrun":
        return _int(env, "RANK"), _int(env, "WORLD_SIZE"), int(env.get("LOCAL_RANK", "0"))
    if launcher == "mpi":
        if "OMPI_COMM_WORLD_RANK" in env:
            return (
                _int(env, "OMPI_COMM_WORLD_RANK"),
                _int(env, "OMPI_COMM_WORLD_SIZE"),
                int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")),
            )
        local = env.get("MPI_LOCALRANKID") or env.get("PMI_LOCAL_RANK") or "0"
        return _int(env, "PMI_RANK"), _int(env, "PMI_SIZE"), int(local)
    return _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), int(env.get("SLURM_LOCALID", "0"))


def _assign_role(role: Role | None, rank: int, size: int, layout: Layout) -> tuple[Role, int]:
    """The role and the rank within it.

    A launch of exactly one role's count keeps ranks as they are. A launch of
    trainers + engines in one world (``srun --het-group=0,1``, MPI MPMD) puts the
    engines first, as component 0 comes first in a het job.
    """
    both = layout.trainer_world_size + layout.num_engines
    if role is not None:
        expected = layout.trainer_world_size if role == "trainer" else layout.num_engines
        if size == expected:
            return role, rank
    if size == both:
        derived: Role = "engine" if rank < layout.num_engines else "trainer"
        if role is not None and role != derived:
            raise UserError(
                f"rank {rank} of {size} (trainers + engines in one launch, engines first) is "
                f"{derived}, but --role {role} was given"
            )
        return derived, rank if derived == "engine" else rank - layout.num_engines
    if role is None:
        raise UserError(
            f"launched {size} ranks, which is neither the plan's {layout.trainer_world_size} trainers, "
            f"its {layout.num_engines} engines, nor both ({both}); pass --role trainer|engine"
        )
    raise UserError(
        f"launched {size} {role} ranks but the plan has {expected}; the srun/mpirun task count must match `miles plan`"
    )


def _het_nodelist(env: Mapping[str, str], group: int | None) -> str | None:
    if group is None:
        return None
    return env.get(f"SLURM_JOB_NODELIST_HET_GROUP_{group}") or env.get(f"SLURM_JOB_NODELIST_PACK_GROUP_{group}")


def _trainer_host(
    env: Mapping[str, str], launcher: Launcher, layout: Layout, role: Role, rank0_host: str | None
) -> str:
    """Host of trainer rank 0, seen from any rank (trainer or engine)."""
    if "MILES_MASTER_ADDR" in env:
        return env["MILES_MASTER_ADDR"]
    if launcher == "torchrun" and "MASTER_ADDR" in env:
        return env["MASTER_ADDR"]
    if rank0_host:
        return rank0_host
    het = _het_nodelist(env, layout.trainer_het_group)
    if het:
        return first_host(het)
    if role == "trainer" and launcher == "slurm" and env.get("SLURM_STEP_NODELIST"):
        return first_host(env["SLURM_STEP_NODELIST"])
    if env.get("SLURM_JOB_NODELIST"):
        return first_host(env["SLURM_JOB_NODELIST"])
    if "MASTER_ADDR" in env:
        return env["MASTER_ADDR"]
    if launcher == "mpi":
        raise UserError("mpirun outside a Slurm allocation: set MASTER_ADDR (host of rank 0) or install mpi4py")
    return "127.0.0.1"


def _ports(env: Mapping[str, str], launcher: Launcher, layout: Layout) -> tuple[int, int]:
    """Trainer master port and weight-update port: explicit MILES_* first, then the launcher's
    MASTER_PORT (not under srun, where a container hook may have set one for the whole job),
    then the plan (derived from the job id)."""
    launcher_port = env.get("MASTER_PORT") if launcher != "slurm" else None
    master = env.get("MILES_MASTER_PORT") or launcher_port or layout.master_port
    weight = env.get("MILES_WEIGHT_UPDATE_PORT") or layout.weight_update_port
    return int(master), int(weight)


def _engine_port(env: Mapping[str, str], layout: Layout, index: int) -> int:
    if env.get("MILES_ENGINE_PORT"):
        return int(env["MILES_ENGINE_PORT"])
    if index >= len(layout.engine_http_ports):
        raise UserError(f"engine {index} has no HTTP port in the plan ({len(layout.engine_http_ports)} ports)")
    return layout.engine_http_ports[index]


def _launch_id(env: Mapping[str, str], launcher: Launcher, job_id: str | None, restart: int) -> str:
    if env.get("MILES_LAUNCH_ID"):
        return env["MILES_LAUNCH_ID"]
    if launcher == "mpi" and (env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_ess_base_jobid")):
        return f"mpi-{env.get('PMIX_NAMESPACE') or env.get('OMPI_MCA_ess_base_jobid')}"
    return f"slurm-{job_id}.{restart}" if job_id else "local"


def task_context(
    env: Mapping[str, str],
    layout: Layout,
    *,
    role: Role | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    cuda_available: bool = False,
    device_pref: Literal["auto", "cuda", "cpu"] = "auto",
    rank0_host: str | None = None,
) -> TaskContext:
    """Work out this process's :class:`TaskContext` from its environment and the plan's layout."""
    launcher = detect_launcher(env)
    # MILES_JOB_ID (the batch shell's SLURM_JOB_ID) is the het leader's id in every step.
    job_id = env.get("MILES_JOB_ID") or env.get("SLURM_JOB_ID")
    if job_id and job_id.isdigit():
        layout = layout.for_job(int(job_id))
    role = role or env.get("MILES_ROLE") or None  # type: ignore[assignment]
    if role not in (None, "trainer", "engine"):
        raise UserError(f"role {role!r}: use trainer or engine")
    raw_rank, size, local_rank = _launcher_ranks(env, launcher)
    role_, rank = _assign_role(role, raw_rank, size, layout)
    if role_ == "trainer":
        world = layout.trainer_world_size
        het_group = layout.trainer_het_group
    else:
        world = layout.num_engines
        het_group = layout.engine_het_group

    trainer_host = _trainer_host(env, launcher, layout, role_, rank0_host)
    master_port, weight_port = _ports(env, launcher, layout)

    if device_pref == "cuda" and not cuda_available:
        raise UserError('cluster.device = "cuda" but torch sees no GPU on this node; use "auto" or "cpu"')
    device: Literal["cuda", "cpu"] = "cuda" if cuda_available and device_pref != "cpu" else "cpu"

    engine_index = rank if role_ == "engine" else None
    if role_ == "trainer":
        wu_rank = 0 if rank == 0 else None
    else:
        offsets = layout.engine_rank_offsets or tuple(1 + i * layout.engine_tp for i in range(layout.num_engines))
        wu_rank = offsets[rank]
    node_name = env.get("SLURMD_NODENAME") or env.get("HOSTNAME") or os.uname().nodename
    resolved_run_dir = run_dir or env.get("MILES_RUN_DIR")
    if not resolved_run_dir:
        raise UserError("no run directory: pass --run-dir or set MILES_RUN_DIR")
    restart = int(env.get("MILES_RESTART_COUNT") or env.get("SLURM_RESTART_COUNT") or 0)
    return TaskContext(
        role=role_,
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        node_index=int(env.get("SLURM_NODEID", "0")) if launcher == "slurm" else int(env.get("GROUP_RANK", "0")),
        node_name=node_name,
        het_group=het_group,
        engine_index=engine_index,
        num_engines=layout.num_engines,
        master_addr=trainer_host,
        master_port=master_port,
        weight_update_addr=env.get("MILES_WEIGHT_UPDATE_ADDR", trainer_host),
        weight_update_port=weight_port,
        weight_update_world_size=1 + layout.num_engines * layout.engine_tp,
        weight_update_rank=wu_rank,
        engine_host=env.get("MILES_ENGINE_HOST") or node_name,
        engine_port=_engine_port(env, layout, rank) if role_ == "engine" else None,
        engine_nccl_port=(
            layout.engine_nccl_ports[rank] if role_ == "engine" and rank < len(layout.engine_nccl_ports) else None
        ),
        engine_gpus=layout.engine_gpus[rank] if role_ == "engine" and rank < len(layout.engine_gpus) else (),
        device=device,
        backend="nccl" if device == "cuda" else "gloo",
        run_dir=Path(resolved_run_dir),
        job_id=job_id,
        restart_count=restart,
        launcher=launcher,
        launch_id=_launch_id(env, launcher, job_id, restart),
    )
