"""The non-weight part of the RL state, and which spec changes a resume accepts.

Weights and optimizer go through the actor (torch.distributed.checkpoint); this
module captures the rest as plain JSON: RNG states of python, numpy, torch and
CUDA, and the spec fields a resumed run must share with the run that saved.
JSON rather than pickle: nothing is ever unpickled from a checkpoint.
"""

from __future__ import annotations

import base64
import random
from dataclasses import asdict
from typing import Any

from miles.errors import UserError
from miles.spec.tables import Spec


def capture_rng() -> dict[str, Any]:
    """This process's RNG states, JSON-able."""
    import numpy as np
    import torch

    np_state: Any = np.random.get_state(legacy=True)
    py_state: Any = random.getstate()
    state: dict[str, Any] = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": {
            "kind": np_state[0],
            "keys": np_state[1].tolist(),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng`."""
    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )


# Spec keys whose change would make the resumed run a different run. Everything else
# (logging, save interval, keep_last, num_rollout to extend a run, Slurm time ...) may change.
BINDING_KEYS: dict[str, tuple[str, ...]] = {
    "model": ("hf_checkpoint", "builtin", "dtype"),
    "rollout": (
        "prompt_data",
        "input_key",
        "label_key",
        "apply_chat_template",
        "rollout_shuffle",
        "rollout_seed",
        "rollout_batch_size",
        "n_samples_per_prompt",
        "rollout_temperature",
        "rollout_top_p",
        "rollout_top_k",
        "rollout_max_response_len",
        "rm_type",
        "custom_rm_path",
    ),
    "train": ("global_batch_size", "num_steps_per_rollout", "micro_batch_size"),
    "perf": ("backend", "tp", "pp", "cp", "ep"),
    "grpo": (
        "advantage_estimator",
        "use_kl_loss",
        "kl_loss_coef",
        "kl_loss_type",
        "eps_clip",
        "eps_clip_high",
        "eps_clip_c",
        "entropy_coef",
    ),
    "run": ("seed",),
}


def binding_fields(spec: Spec) -> dict[str, Any]:
    """The values of :data:`BINDING_KEYS` in ``spec``, as ``table.key`` -> value."""
    out: dict[str, Any] = {}
    for table, keys in BINDING_KEYS.items():
        values = asdict(getattr(spec, table))
        for key in keys:
            out[f"{table}.{key}"] = values[key]
    return out


def check_resumable(saved: dict[str, Any], spec: Spec, where: str) -> None:
    """Refuse to resume when a binding spec value differs from the one the checkpoint was made with."""
    now = binding_fields(spec)
    changed = [(k, saved.get(k), now[k]) for k in now if k in saved and saved[k] != now[k]]
    if changed:
        lines = "\n".join(f"  {k}: checkpoint has {old!r}, spec has {new!r}" for k, old, new in changed)
        raise UserError(
            f"cannot resume from {where}: the spec changed in ways that would make a different run:\n{lines}\n"
            "Restore these values, or start a new run (a new [run] name or run_dir, or [ckpt] save elsewhere)."
        )
