"""``[sglang]`` pass-through flags, checked against the pinned SGLang release's own flag list.

Any ``[sglang]`` key that is not a field of :class:`~miles.spec.tables.SglangConfig`
is handed to ``python -m sglang.launch_server`` as ``--key-with-dashes value``.
A typo there would otherwise surface only on the cluster, minutes after the job
started, as an argparse error in an engine log; so the keys are checked here
against ``sglang_flags.json``, which ``miles.sglang.flags`` generates
from the pinned SGLang wheel (its docstring describes the format). Without that file (a checkout that never generated
it) the
names cannot be checked and are passed through as written.

Some flags are miles' to set, because they follow from other spec keys or from
the plan; :data:`MANAGED_FLAGS` lists them and where to set them instead.
"""

from __future__ import annotations

import difflib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from miles.spec.fieldtypes import given

FLAGS_FILE = Path(__file__).with_name("sglang_flags.json")

MANAGED_FLAGS: dict[str, str] = {
    "model_path": "miles passes the model; set [model] hf_checkpoint (or builtin)",
    "tokenizer_path": "miles passes the tokenizer with the model; set [model] hf_checkpoint",
    "host": "miles binds each engine to its node's address",
    "port": "miles derives engine ports from the Slurm job id",
    "tp_size": "set [sglang] rollout_num_gpus_per_engine instead",
    "tensor_parallel_size": "set [sglang] rollout_num_gpus_per_engine instead",
    "dtype": "set [model] dtype instead",
    "random_seed": "set [rollout] rollout_seed instead",
    "trust_remote_code": "set [model] trust_remote_code instead",
    "nnodes": "miles plans the engines' nodes; set [sglang] rollout_num_gpus_per_engine and [cluster]",
    "node_rank": "miles plans the engines' nodes",
    "dist_init_addr": "miles plans the engines' nodes and ports",
    "base_gpu_id": "miles places engines on GPUs",
    "api_key": "miles gives the engines the run's own key (run_dir/engine.key); set [rollout] engine_auth = false "
    "to run them without one",
}
"""SGLang flags a user may not pass through, with what to do instead."""


def load_flags(path: Path | None = None) -> dict[str, dict[str, Any]] | None:
    """The flag table ``{name_with_underscores: {"type": ..., ...}}``, or None when the file is absent."""
    path = path or FLAGS_FILE
    return _read_flags(path, path.stat().st_mtime_ns if path.is_file() else 0)


@lru_cache(maxsize=4)
def _read_flags(path: Path, mtime_ns: int) -> dict[str, dict[str, Any]] | None:
    if not mtime_ns:
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("flags"), dict):
        return None
    return {str(k): (v if isinstance(v, dict) else {}) for k, v in data["flags"].items()}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_SCALAR_CHECKS: dict[str, tuple[str, Any]] = {
    "int": ("an integer", _is_int),
    "float": ("a number", _is_number),
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
}


def _canonical(key: str, flags: dict[str, dict[str, Any]]) -> str | None:
    if key in flags:
        return key
    return next((name for name, info in flags.items() if key in info.get("aliases", [])), None)


def check_flag(key: str, value: Any, flags: dict[str, dict[str, Any]] | None) -> str | None:
    """Why ``[sglang] key = value`` cannot be passed to SGLang, or None when it can.

    Types follow ``sglang_flags.json``: ``int``, ``float`` (integers too), ``str``,
    ``bool``, ``list`` (a TOML array of ``item_type``) and ``json`` (any value, passed
    as one JSON argument); ``choices`` close the set of values (of each item for lists).
    """
    if "-" in key:
        return f"write SGLang flags with underscores: {key.replace('-', '_')}"
    canonical = _canonical(key, flags) if flags is not None else key
    for name in (key, canonical):
        if name in MANAGED_FLAGS:
            return f"is set by miles, not passed through to SGLang: {MANAGED_FLAGS[name]}"
    if flags is None:
        return None
    if canonical is None:
        close = difflib.get_close_matches(key, list(flags), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"is neither a miles [sglang] key nor a flag of the pinned SGLang (sglang.launch_server --help){hint}"
    info = flags[canonical]
    flag = f"SGLang --{canonical.replace('_', '-')}"
    kind = str(info.get("type", ""))
    choices = info.get("choices") if isinstance(info.get("choices"), list) else None
    if kind == "json" or (info.get("nargs") == "?" and value is True):
        return None
    if kind == "list":
        words, ok = _SCALAR_CHECKS.get(str(info.get("item_type", "str")), _SCALAR_CHECKS["str"])
        if not isinstance(value, list):
            return f"expected a list of {words.split(' ', 1)[-1]}s ({flag}), got {given(value)}"
        items = value
    elif kind in _SCALAR_CHECKS:
        words, ok = _SCALAR_CHECKS[kind]
        items = [value]
    else:
        return None
    for item in items:
        if not ok(item):
            return f"expected {words} ({flag}), got {given(item)}"
        if choices and item not in choices:
            shown = ", ".join(json.dumps(c) for c in choices)
            return f"expected one of {shown} ({flag}), got {given(item)}"
    return None
