"""Helpers for driving real engine servers through miles' launcher (SGLang on CPU, or the embedded engine) and for
asking them what they hold.

The SGLang variants need ``.venv-sglang`` (``scripts/sglang-env.sh`` builds it;
``scripts/test`` does when it can install packages). Without it they are
skipped with a reason that says how to get it; the embedded variants run anyway.
SGLang's CPU engine runs with ``SGLANG_USE_CPU_ENGINE=1 --device cpu
--attention-backend torch_native`` and the two test-only shims of
``tests/sglang/shims`` on its PYTHONPATH (see their docstrings).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

import torch

from miles.job.environment import TaskContext
from miles.job.ports import free_port
from miles.sample import Sample
from miles.sglang import launcher as sl
from miles.sglang import protocol as proto
from miles.spec.tables import ModelConfig, RolloutConfig, SglangConfig, Spec

ROOT = Path(__file__).resolve().parents[2]
SGLANG_VENV = Path(os.environ.get("MILES_SGLANG_VENV", ROOT / ".venv-sglang"))
SGLANG_PYTHON = SGLANG_VENV / "bin" / "python"
SHIMS = Path(__file__).resolve().parent / "shims"
KINDS = ("sglang", "embedded")
START_DEADLINE_S = 420.0
"""SGLang's CPU server imports for about a minute on a busy 2-core machine before it is healthy."""

SKIP_REASON = (
    f"SGLang environment {SGLANG_VENV} is absent: run scripts/sglang-env.sh (needs pip access to PyPI) "
    "to test miles against a real SGLang server"
)

CPU_SERVER_ARGS: dict[str, object] = {
    "device": "cpu",
    "attention_backend": "torch_native",
    "max_total_tokens": 4096,
    "skip_server_warmup": True,
}
"""The ``[sglang]`` keys of a CPU run, passed through and checked like any user's."""


def sglang_available() -> bool:
    return SGLANG_PYTHON.is_file()


def engine_spec(kind: str) -> Spec:
    return Spec(
        model=ModelConfig(dtype="float32"),
        rollout=RolloutConfig(engine=kind, rollout_seed=0),  # type: ignore[arg-type]
        sglang=SglangConfig(server_args=dict(CPU_SERVER_ARGS) if kind == "sglang" else {}),
    )


def engine_extra_env(kind: str) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if kind == "sglang":
        env["PYTHONPATH"] = str(SHIMS)
    return env


def launch(kind: str, index: int, model_dir: Path, log_dir: Path, api_key: str) -> sl.EngineProcess:
    """An engine process of ``kind`` built by miles' launcher (not started)."""
    python = str(SGLANG_PYTHON) if kind == "sglang" else sys.executable
    spec = engine_spec(kind)
    entry = sl.engine_launch(
        spec,
        index=index,
        model_path=str(model_dir),
        host="127.0.0.1",
        port=free_port(0),
        api_key=api_key,
        log_dir=log_dir,
        python=python,
    )
    return sl.EngineProcess(entry, extra_env=engine_extra_env(kind))


def driver_task(
    run_dir: Path, num_engines: int, master_port: int = 20000, weight_update_port: int | None = None
) -> TaskContext:
    """Trainer rank 0 (the driver) of a one-trainer CPU run with ``num_engines`` engines announced in ``run_dir``."""
    return TaskContext(
        role="trainer",
        rank=0,
        world_size=1,
        local_rank=0,
        node_index=0,
        node_name="localhost",
        het_group=None,
        engine_index=None,
        num_engines=num_engines,
        master_addr="127.0.0.1",
        master_port=master_port,
        weight_update_addr="127.0.0.1",
        weight_update_port=weight_update_port or master_port + 2,
        weight_update_world_size=1 + num_engines,
        weight_update_rank=0,
        engine_host="127.0.0.1",
        engine_port=None,
        engine_nccl_port=None,
        engine_gpus=(),
        device="cpu",
        backend="gloo",
        run_dir=run_dir,
        job_id=None,
        restart_count=0,
        launcher="torchrun",
        launch_id="test-launch",
    )


def post(url: str, api_key: str, ep: proto.Endpoint, body: dict[str, Any] | None = None) -> Any:
    """``ep`` of the engine (or router) at ``url``, with the key: its JSON answer, else its text."""
    req = urllib.request.Request(
        url + ep.path,
        data=json.dumps(body or {}).encode(),
        method=ep.method,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        raw = r.read()
    return json.loads(raw) if raw.strip().startswith(b"{") else raw.decode()


def hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as Hugging Face loads them: what a weight sync pushes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def sharpened(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Different weights whose greedy choices are far from ties, so any correct engine agrees with HF on them."""
    gen = torch.Generator().manual_seed(1)
    out = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in weights.items()}
    out["lm_head.weight"] = out["lm_head.weight"] * 40.0
    return out


def hf_greedy(model_dir: Path, weights: dict[str, torch.Tensor], samples: list[Sample], n: int) -> list[list[int]]:
    """Hugging Face's greedy answers with ``weights``: what an engine holding them must generate."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.load_state_dict(weights)
    outs = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_ids])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            out = gen[0, ids.shape[1] :].tolist()
            eos = model.config.eos_token_id
            outs.append(out[: out.index(eos) + 1] if eos in out else out)  # engines stop at EOS, keeping it
    return outs


def model_info(url: str, api_key: str) -> dict[str, Any]:
    """The engine's ``/get_model_info`` (its ``weight_version`` ...)."""
    req = urllib.request.Request(url + "/get_model_info", headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return dict(json.loads(r.read()))
