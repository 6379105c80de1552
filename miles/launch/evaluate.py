"""``miles eval``: a model evaluated on a spec's ``[eval]`` datasets, on this machine, without training.

The model is an HF directory: a run's ``final/`` export, a ``[ckpt] save_hf`` export, any downloaded model, or by
default the spec's own model (``[model] hf_checkpoint``, or the built-in model the run wrote into its run
directory). One engine of ``[rollout] engine`` serves it; evaluation is the loop's own
(:func:`miles.session.evaluation.evaluate`: same datasets, sampling overrides, reward and figures, and the
sampling seeds of the loop's evaluation before training, so ``miles eval`` of a run's initial model repeats that
run's first evaluation). The figures are printed as a table and written as JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

from miles.data.dataset import PromptDataset
from miles.errors import UserError
from miles.job import rundir
from miles.job.ports import free_port
from miles.plan import run_dir_of
from miles.reward.model import RewardModel
from miles.rollout.client import BlockingRolloutClient
from miles.rollout.custom import CustomGeneration
from miles.sample import Sample
from miles.session.evaluation import EvalSettings, evaluate, table
from miles.sglang.launcher import EngineProcess, engine_launch
from miles.spec.tables import Spec

ENGINE_START_S = 600.0
"""How long the engine may take to load the model and answer ``/health_generate``."""


class _Engine:
    """One engine behind the client, answering the loop's ``generate`` call: single-turn, or through the spec's
    generate or rollout function, as the loop's engines answer it."""

    def __init__(self, url: str, spec: Spec, tokenizer: Any) -> None:
        self.client = BlockingRolloutClient([url], api_key=None)
        self.rollout = spec.rollout
        self.custom = CustomGeneration.from_spec(spec, tokenizer)

    def generate(
        self, samples: list[Sample], rollout_id: int, weight_version: int, evaluation: bool = False, **overrides: Any
    ) -> None:
        custom = self.custom
        if custom is None:
            self.client.generate(samples, self.rollout, rollout_id, **overrides)
            return
        samples[:] = self.client.run(
            lambda c: custom.run(c, samples, rollout_id, weight_version, evaluation=evaluation, overrides=overrides)
        )

    def close(self) -> None:
        self.client.close()


def model_dir_for(spec: Spec, model: str | None) -> Path:
    """The HF directory to evaluate; a miles checkpoint directory is refused with the directories that work."""
    if model is None:
        if spec.model.builtin:
            path = Path(run_dir_of(spec)) / "model"
            if not path.is_dir():
                path.parent.mkdir(parents=True, exist_ok=True)
                path = Path(rundir.model_dir_of(spec, path.parent))
            return path
        return Path(spec.model.hf_checkpoint)
    path = Path(model)
    if not path.is_dir():
        raise UserError(f"--model {model}: no such directory; pass an HF model directory (e.g. <run_dir>/final)")
    if not (path / "config.json").is_file():
        raise UserError(
            f"--model {model} is not an HF model directory (no config.json); a miles checkpoint holds trainer "
            "state: evaluate <run_dir>/final (written when a run completes) or a [ckpt] save_hf export"
        )
    return path


def run(spec: Spec, model: str | None, out: str | None, stream: IO[str] | None = None) -> int:
    """Evaluate, print the table, write the JSON; returns the exit code."""
    if not spec.eval.eval_prompt_data:
        raise UserError('miles eval needs [eval] eval_prompt_data = { name = "/path/to/eval.jsonl" } in the spec')
    from transformers import AutoTokenizer

    stream = stream or sys.stdout
    model_dir = model_dir_for(spec, model)
    out_path = Path(out) if out else Path(run_dir_of(spec)) / "eval" / f"{model_dir.resolve().name}.json"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=spec.model.trust_remote_code)
    datasets = PromptDataset.eval_from_spec(spec.eval, spec.rollout, tokenizer)
    reward = RewardModel.from_spec(spec.rollout, base_dir=Path(spec.source).parent if spec.source else None)
    device = _device(spec)
    with tempfile.TemporaryDirectory(prefix="miles-eval-") as logs:
        launch = engine_launch(
            spec,
            index=0,
            model_path=str(model_dir),
            host="127.0.0.1",
            port=free_port(host="127.0.0.1"),
            api_key=None,
            log_dir=Path(logs),
            gpus=(0,) if device == "cuda" else (),
            device=device,
        )
        process = EngineProcess(launch)
        process.start()
        engine = None
        try:
            process.wait_healthy(ENGINE_START_S)
            engine = _Engine(process.url, spec, tokenizer)
            values = evaluate(engine, reward, datasets, EvalSettings.from_spec(spec), step=0, version=0)
        finally:
            if engine is not None:
                engine.close()
            process.stop()
            reward.close()
    print(f"miles eval: {model_dir}", file=stream)
    print(table(values), file=stream)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"model": str(model_dir), "spec": spec.source, "metrics": values}, indent=2) + "\n")
    print(f"miles eval: wrote {out_path}", file=stream)
    return 0


def _device(spec: Spec) -> str:
    if spec.cluster.device == "cpu" or spec.cluster.gpus_per_node == 0:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
