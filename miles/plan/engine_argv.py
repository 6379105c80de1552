"""Each engine's exact command line, a pure function of the spec: what ``miles plan`` shows, what the launcher runs.

One source for both, so the line a user checks in the plan (are my ``[sglang]``
pass-through flags spelled the way SGLang wants them?) is the line that starts
on the node. For SGLang::

    python -m sglang.launch_server --model-path M --host H --port P --tp-size T --dtype D --random-seed S
        [--api-key K] [--mem-fraction-static F] [--nccl-port N] [--trust-remote-code] [--enable-memory-saver]
        [every other [sglang] key as --key-with-dashes value]

and for the embedded engine ``python -m miles.engine.server`` with the same
address, key and seed. Pure and torch-free: the planner path imports it.
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

API_KEY_SHOWN = "$MILES_ENGINE_API_KEY"
"""What the plan shows for the engines' API key, which the job makes at start and never writes into the plan."""


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
    api_key: str | None,
    tp_size: int | None = None,
    seed: int | None = None,
    nccl_port: int | None = None,
    python: str | None = None,
    gpu: bool = False,
) -> list[str]:
    """The ``sglang.launch_server`` command line of one engine (``gpu``: it runs on GPUs)."""
    sg = spec.sglang
    argv = [
        python or spec.slurm.python,
        "-m",
        "sglang.launch_server",
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
    if api_key:
        argv += ["--api-key", api_key]
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
    api_key: str | None,
    seed: int | None = None,
    device: str = "cpu",
    python: str | None = None,
) -> list[str]:
    """The embedded engine's command line (``python -m miles.engine.server``), same address, key and seed."""
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
    if api_key:
        argv += ["--api-key", api_key]
    if spec.model.trust_remote_code:
        argv.append("--trust-remote-code")
    return argv


def planned_model_path(spec: Spec, run_dir: str) -> str:
    """The model directory the engines load: ``[model] hf_checkpoint``, or the built-in model miles writes at start."""
    return f"{run_dir.rstrip('/')}/model" if spec.model.builtin else spec.model.hf_checkpoint


def plan_argvs(spec: Spec, plan: Plan, only: Sequence[int] | None = None) -> list[list[str]]:
    """Each engine's command line as the job starts it (of the engines in ``only``, else all): the plan's port,
    NCCL port and seed, bound on every interface, the job's API key as the variable that holds it, SGLang's
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
                    api_key=API_KEY_SHOWN,
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
                    api_key=API_KEY_SHOWN,
                    seed=seed,
                    device=device,
                    python=spec.slurm.python,
                )
            )
    return out
