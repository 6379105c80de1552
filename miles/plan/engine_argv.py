"""Each engine's exact command line, a pure function of the spec: what ``miles plan`` shows, what the launcher runs.

One source for both, so the line a user checks in the plan (are my ``[sglang]``
pass-through flags spelled the way SGLang wants them?) is the line that starts
on the node. For SGLang::

    python -m sglang.launch_server --model-path M --host H --port P --tp-size T --dtype D --random-seed S
        [--mem-fraction-static F] [--nccl-port N] [--trust-remote-code] [--enable-memory-saver]
        [every other [sglang] key as --key-with-dashes value]

and for the embedded engine ``python -m miles.engine.server`` with the same
address and seed. Pure and torch-free: the planner path imports it.

The engine key never appears on a command line, where every user of the node
can read it (``ps``, ``/proc/PID/cmdline``): it travels in the process's
environment (``MILES_ENGINE_API_KEY``, readable by its owner only). The
embedded server reads it from there; SGLang and sglang-router start through
:data:`KEY_FROM_ENV`, which adds ``--api-key`` to their arguments inside the
process.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from miles.errors import UserError
from miles.spec.passthrough import FLAGS_FILE, check_flag, load_flags
from miles.spec.tables import Spec

if TYPE_CHECKING:
    from miles.plan.model import Plan

KEY_ENV = "MILES_ENGINE_API_KEY"
"""The variable that carries the engine key into an engine's (and the router's) process."""

KEY_FROM_ENV = (
    "import os,runpy,sys;m=sys.argv[1];"
    f"sys.argv=[m,*sys.argv[2:],'--api-key',os.environ['{KEY_ENV}']];"
    "runpy.run_module(m,run_name='__main__',alter_sys=True)"
)
"""``python -c KEY_FROM_ENV MODULE ARGS...`` runs ``python -m MODULE ARGS... --api-key KEY`` with the key read from
the environment inside the process, so the command line the node shows holds no secret. Plain Python, so it runs in
an interpreter without miles (SGLang's own environment)."""


def keyed_module(python: str, module: str, keyed: bool) -> list[str]:
    """The start of a command line that runs ``module``, through :data:`KEY_FROM_ENV` when it needs the key."""
    return [python, "-c", KEY_FROM_ENV, module] if keyed else [python, "-m", module]


def _alias_map(flags: Mapping[str, dict[str, Any]]) -> dict[str, str]:
    """Every accepted spelling (flag key or alias) -> its flag key."""
    out = {key: key for key in flags}
    for key, entry in flags.items():
        for alias in entry.get("aliases", []):
            out.setdefault(alias, key)
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def passthrough_args(server_args: Mapping[str, Any], flags: Mapping[str, dict[str, Any]] | None = None) -> list[str]:
    """``[sglang]`` pass-through keys as ``launch_server`` arguments, each checked against the pinned flag list.

    ``true`` adds the bare flag; ``false`` adds ``--no-<flag>`` for SGLang's negatable
    flags and nothing for plain switches (whose default is off); a list adds one
    argument per item; a ``json`` flag takes a table or array as one JSON string.
    """
    table: dict[str, dict[str, Any]] = dict(flags) if flags is not None else (load_flags() or {})
    names = _alias_map(table)
    argv: list[str] = []
    for given_key, value in server_args.items():
        problem = check_flag(given_key, value, table)
        if problem is not None:
            raise UserError(f"[sglang] {given_key} {problem} (flags of SGLang from {FLAGS_FILE.name})")
        key = names[given_key]
        info = table[key]
        kind = info.get("type")
        if info.get("nargs") == "?" and value is True:
            argv.append(_flag(key))
        elif kind == "bool":
            if value:
                argv.append(_flag(key))
            elif info.get("negatable"):
                argv.append("--no-" + key.replace("_", "-"))
            elif info.get("default") is True:
                raise UserError(
                    f"[sglang] {key} = false: SGLang's {_flag(key)} is on by default and cannot be "
                    "turned off from the command line"
                )
        elif kind == "list":
            items = value if isinstance(value, list) else [value]
            argv += [_flag(key), *(str(v) for v in items)]
        elif kind == "json":
            argv += [_flag(key), value if isinstance(value, str) else json.dumps(value)]
        else:
            argv += [_flag(key), str(value)]
    return argv


def train_offload(spec: Spec, gpu: bool) -> bool:
    """Whether the actor leaves the GPU while the engines generate (``[perf] offload_train``; unset: on when
    colocated on GPUs)."""
    if spec.perf.offload_train is not None:
        return spec.perf.offload_train
    return spec.cluster.mode == "colocate" and gpu


def rollout_offload(spec: Spec, gpu: bool) -> bool:
    """Whether the engines release their memory while the actor trains (``[perf] offload_rollout``; unset: on when
    colocated on GPUs). The loop's release calls and SGLang's ``--enable-memory-saver`` both follow this."""
    if spec.perf.offload_rollout is not None:
        return spec.perf.offload_rollout
    return spec.cluster.mode == "colocate" and gpu


def _memory_saver(spec: Spec, gpu: bool) -> list[str]:
    """SGLang frees memory on ``/release_memory_occupation`` only when started with ``--enable-memory-saver``."""
    if not rollout_offload(spec, gpu):
        return []
    asked = spec.sglang.server_args.get("enable_memory_saver")
    if asked is False:
        raise UserError(
            "[sglang] enable_memory_saver = false, but [perf] offload_rollout has the engines release their memory "
            "while the actor trains, which SGLang does only with the memory saver: remove enable_memory_saver, or "
            "set [perf] offload_rollout = false"
        )
    return [] if asked else ["--enable-memory-saver"]


def sglang_argv(
    spec: Spec,
    *,
    model_path: str,
    host: str,
    port: int,
    keyed: bool,
    tp_size: int | None = None,
    seed: int | None = None,
    nccl_port: int | None = None,
    python: str | None = None,
    gpu: bool = False,
) -> list[str]:
    """The ``sglang.launch_server`` command line of one engine; ``keyed``: it requires the key in ``KEY_ENV``;
    ``gpu``: it runs on GPUs."""
    sg = spec.sglang
    argv = [
        *keyed_module(python or spec.slurm.python, "sglang.launch_server", keyed),
        "--model-path",
        model_path,
        "--host",
        host,
        "--port",
        str(port),
        "--tp-size",
        str(tp_size or sg.rollout_num_gpus_per_engine),
        "--dtype",
        spec.model.dtype,
        "--random-seed",
        str(spec.rollout.rollout_seed if seed is None else seed),
    ]
    if sg.mem_fraction_static is not None:
        argv += ["--mem-fraction-static", str(sg.mem_fraction_static)]
    if nccl_port is not None:
        argv += ["--nccl-port", str(nccl_port)]
    if spec.model.trust_remote_code:
        argv.append("--trust-remote-code")
    return argv + _memory_saver(spec, gpu) + passthrough_args(sg.server_args)


def embedded_argv(
    spec: Spec,
    *,
    model_path: str,
    host: str,
    port: int,
    seed: int | None = None,
    device: str = "cpu",
    python: str | None = None,
) -> list[str]:
    """The embedded engine's command line (``python -m miles.engine.server``), same address and seed; the server
    reads the key, when the run has one, from ``KEY_ENV``."""
    argv = [
        python or sys.executable,
        "-m",
        "miles.engine.server",
        "--model",
        model_path,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        spec.model.dtype,
        "--device",
        device,
        "--seed",
        str(spec.rollout.rollout_seed if seed is None else seed),
    ]
    if device == "cuda":
        argv += ["--max-batch-size", str(EMBEDDED_GPU_BATCH)]
    if spec.model.trust_remote_code:
        argv.append("--trust-remote-code")
    return argv


EMBEDDED_GPU_BATCH = 256
"""Rows the embedded engine decodes at once on a GPU. A small model's decode step costs about the same at 32 rows
as at 256 (it is bound by launches and weight reads, not by the rows), so a rollout sent as a few large batches
takes a fraction of the time of many small ones."""

REQUEST_CHUNK = 32
"""Samples per batched ``/generate`` request to SGLang (whose scheduler batches across requests anyway) and to the
embedded engine on CPUs (where a decode step's cost grows with its rows)."""


def request_chunk(spec: Spec, device: str, num_engines: int) -> int:
    """Samples per batched ``/generate`` request of a rollout: a pure function of the spec and the plan, so the
    same rollout is cut into the same batches after a resume (:mod:`miles.rollout.client`).

    The embedded engine generates one request as one batch, one batch at a time. On a GPU the rollout is
    therefore cut into as few requests as the engines can take at once: one per engine, up to
    :data:`EMBEDDED_GPU_BATCH` rows each.
    """
    if spec.rollout.engine != "embedded" or device != "cuda":
        return REQUEST_CHUNK
    r = spec.rollout
    prompts = max(r.rollout_batch_size or 1, r.over_sampling_batch_size or 0)  # the four knobs are resolved here
    per_engine = -(-prompts * (r.n_samples_per_prompt or 1) // max(1, num_engines))
    return max(1, min(EMBEDDED_GPU_BATCH, per_engine))


def planned_model_path(spec: Spec, run_dir: str) -> str:
    """The model directory the engines load: ``[model] hf_checkpoint``, or the built-in model miles writes at start."""
    return f"{run_dir.rstrip('/')}/model" if spec.model.builtin else spec.model.hf_checkpoint


def plan_argvs(spec: Spec, plan: Plan, only: Sequence[int] | None = None) -> list[list[str]]:
    """Each engine's command line as the job starts it (of the engines in ``only``, else all): the plan's port,
    NCCL port and seed, bound on every interface, SGLang's
    interpreter as ``[slurm] python``."""
    model = planned_model_path(spec, plan.run_dir)
    out = []
    for e in plan.engines if only is None else [plan.engines[i] for i in only]:
        seed = spec.rollout.rollout_seed + e.index
        port = int(plan.ports.engine_http[e.index])
        if spec.rollout.engine == "sglang":
            nccl = plan.ports.engine_nccl[e.index] if plan.ports.engine_nccl else None
            out.append(
                sglang_argv(
                    spec,
                    model_path=model,
                    host="0.0.0.0",
                    port=port,
                    keyed=spec.rollout.engine_auth,
                    tp_size=e.tp,
                    seed=seed,
                    nccl_port=nccl,
                    gpu=plan.device == "gpu",
                )
            )
        else:
            device = "cuda" if plan.device == "gpu" else "cpu"
            out.append(
                embedded_argv(
                    spec,
                    model_path=model,
                    host="0.0.0.0",
                    port=port,
                    seed=seed,
                    device=device,
                    python=spec.slurm.python,
                )
            )
    return out
