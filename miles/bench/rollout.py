"""``miles bench rollout``: embedded engine tokens/s vs HF ``generate`` and vs the decode roofline.

Both generators run the same model object (same weights, device and dtype) on
the same prompts in the same process, one after the other, with the same
sampling (temperature, no top-k/top-p) and every row forced to produce exactly
``--max-new-tokens`` tokens (EOS ignored), so tokens/s compare like for like.
The engine is called in-process (:meth:`Engine.generate`), i.e. its compute
path without HTTP, which at a batch of hundreds is a small share. Each side
first runs one untimed batch of the timed shape (the engine captures its CUDA
graphs then; that first call's seconds are reported as well).

The roofline: a decode step must read every weight once, so at best
``batch * bandwidth / weight_bytes`` tokens/s (weights only: KV-cache reads
and the prefill are ignored, so the true limit is lower). The bandwidth comes
from ``--mem-bw-gbs``, the card table, or a copy measured on this device now.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from miles.bench.hardware import memory_bandwidth_gbs, synchronize
from miles.bench.report import Report, machine
from miles.bench.shapes import PRESETS, hf_config, load_config_dict, param_count, with_layers
from miles.engine.core import DTYPES, Engine, GenerationRequest
from miles.engine.sampling import SamplingParams
from miles.errors import UserError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="miles bench rollout", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--config", help="HF config.json (or its directory) of the model (random weights)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a known model shape instead of --config")
    p.add_argument("--model", default=None, help="an HF model directory with weights and tokenizer instead")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (with --config/--preset)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default bfloat16 on GPUs, float32 on CPUs",
    )
    p.add_argument("--device", default=None, help="default cuda:0 if CUDA is available, else cpu")
    p.add_argument("--batch", type=int, default=256, help="prompts generated together (default 256)")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt (EOS ignored)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--mem-bw-gbs", type=float, default=None, help="memory bandwidth, GB/s (default: card table)")
    p.add_argument("--skip-hf", action="store_true", help="do not run HF generate (the engine and roofline only)")
    p.add_argument(
        "--decoder",
        default="auto",
        choices=["auto", "static", "hf"],
        help="the engine's decode path: static KV cache (+ CUDA graphs), HF's forward, or auto",
    )
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the static decode path without CUDA graphs")
    p.add_argument(
        "--fuse",
        choices=["off", "on", "auto", "compare"],
        default="auto",
        help="compile the decode step's elementwise chains and sampling (Triton; CUDA only): off, on, "
        "auto (where it can run), or compare (time the engine without, then with)",
    )
    p.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON to this file")
    return p


def tokenizer_json(vocab_size: int) -> dict[str, Any]:
    """A WordLevel tokenizer naming every id (``<i>``): random-weight models need ids, not text."""
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"<{i}>": i for i in range(len(specials), vocab_size)})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in enumerate(specials)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<pad>"},
    }


def write_model_dir(data: dict[str, Any], out: Path, dtype: str, seed: int = 0) -> Path:
    """A random model of shape ``data`` with an id-level tokenizer, as an HF directory the engine loads."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    cfg = hf_config({**data, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(int(data["vocab_size"]))))
    PreTrainedTokenizerFast(
        tokenizer_file=str(out / "tokenizer.json"),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<pad>",
    ).save_pretrained(out)
    return out


def _timed(fn: Any, device: str) -> float:

    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def run_engine(engine: Any, prompts: list[list[int]], a: argparse.Namespace, device: str) -> tuple[float, int, float]:
    """(seconds, tokens) of the timed batch and the seconds of the first, untimed one.

    The warm-up is the timed batch itself: the engine captures a CUDA graph per batch bucket and attention
    window once per process, which a long-running engine pays once; the first call's seconds are reported too.
    """

    def requests(n_new: int, count: int) -> list[GenerationRequest]:
        return [
            GenerationRequest(
                p, SamplingParams(max_new_tokens=n_new, temperature=a.temperature, ignore_eos=True, sampling_seed=i)
            )
            for i, p in enumerate(prompts[:count])
        ]

    first = _timed(lambda: engine.generate(requests(a.max_new_tokens, len(prompts))), device)
    outs: list[Any] = []
    seconds = _timed(lambda: outs.extend(engine.generate(requests(a.max_new_tokens, len(prompts)))), device)
    return seconds, sum(len(o.output_ids) for o in outs), first


def run_hf(model: Any, prompts: list[list[int]], a: argparse.Namespace, device: str) -> tuple[float, int]:
    import torch

    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)
    sample = a.temperature > 0
    kw: dict[str, Any] = {"do_sample": sample, "pad_token_id": 0, "top_k": 0, "top_p": 1.0}
    if sample:
        kw["temperature"] = a.temperature

    def gen(n_new: int, count: int) -> Any:
        with torch.inference_mode():
            return model.generate(
                input_ids=ids[:count], attention_mask=mask[:count], max_new_tokens=n_new, min_new_tokens=n_new, **kw
            )

    gen(a.max_new_tokens, len(prompts))  # warm-up on the timed shape, as the engine gets
    out: list[Any] = []
    seconds = _timed(lambda: out.append(gen(a.max_new_tokens, len(prompts))), device)
    return seconds, int(out[0][:, ids.shape[1] :].numel())


def main(argv: list[str]) -> int:
    import torch

    a = parser().parse_args(argv)
    for name in ("batch", "prompt_len", "max_new_tokens"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    device = a.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    dtype = a.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    tmp: Path | None = None
    if a.model:
        model_dir = Path(a.model)
        if not (model_dir / "config.json").exists():
            raise UserError(f"--model {a.model}: no config.json there; give an HF model directory")
        data = json.loads((model_dir / "config.json").read_text())
    else:
        data = load_config_dict(a.config, a.preset)
        if a.layers is not None:
            data = with_layers(data, a.layers)
        tmp = Path(tempfile.mkdtemp(prefix="miles-bench-rollout-"))
        model_dir = write_model_dir(data, tmp / "model", dtype)
    try:
        fuse = {"off": False, "compare": False, "on": True, "auto": None}[a.fuse]
        engine = Engine(
            model_dir,
            device=device,
            dtype=dtype,
            seed=0,
            max_batch_size=a.batch,
            decoder=a.decoder,
            cuda_graphs=not a.no_cuda_graphs,
            fuse=fuse,
        )
        vocab = int(engine.vocab_size)
        rng = random.Random(0)
        prompts = [[rng.randrange(3, vocab) for _ in range(a.prompt_len)] for _ in range(a.batch)]
        rows: list[dict[str, Any]] = []
        secs, toks, first = run_engine(engine, prompts, a, device)
        fused = engine.decoder is not None and engine.decoder.fusion.on
        rows.append(
            {
                "engine": "miles embedded" + (" (fused)" if fused else ""),
                "seconds": secs,
                "tokens": toks,
                "tokens_per_s": toks / secs,
            }
        )
        if a.fuse == "compare":
            if engine.decoder is None:
                raise UserError("--fuse compare needs the static decode path (this model runs on HF's forward)")
            engine.decoder.set_fusion(True)
            secs, toks, first_fused = run_engine(engine, prompts, a, device)
            rows.append(
                {"engine": "miles embedded (fused)", "seconds": secs, "tokens": toks, "tokens_per_s": toks / secs}
            )
        if not a.skip_hf:
            secs, toks = run_hf(engine.model, prompts, a, device)
            rows.append({"engine": "HF generate", "seconds": secs, "tokens": toks, "tokens_per_s": toks / secs})
        params = sum(p.numel() for p in engine.model.parameters())
        weight_bytes = params * DTYPES[dtype].itemsize
        bw, bw_source = memory_bandwidth_gbs(device, a.mem_bw_gbs)
        roof = a.batch * bw * 1e9 / weight_bytes
        rows.append(
            {
                "engine": "roofline (weights only)",
                "seconds": None,
                "tokens": a.batch * a.max_new_tokens,
                "tokens_per_s": roof,
            }
        )
        for r in rows:
            r["of_roofline"] = r["tokens_per_s"] / roof
        report = Report(
            "rollout",
            settings={
                "model_type": data.get("model_type"),
                "layers": data.get("num_hidden_layers"),
                "params": params if a.model else param_count(data),
                "dtype": dtype,
                "batch": a.batch,
                "prompt_len": a.prompt_len,
                "max_new_tokens": a.max_new_tokens,
                "temperature": a.temperature,
                "preset": a.preset,
                "config": a.config,
                "model": a.model,
            },
        )
        report.machine = machine(device)
        report.rows = rows
        report.summary = {
            "weight_bytes": weight_bytes,
            "mem_bw_gbs": bw,
            "mem_bw_source": bw_source,
            "roofline_tokens_per_s": roof,
            "engine_first_call_s": first,
            "engine_decoder": "hf"
            if engine.decoder is None
            else ("static+cuda-graphs" if engine.decoder.cuda_graphs else "static")
            + ("+fused" if engine.decoder.fusion.on else ""),
        }
        if a.fuse == "compare":
            report.summary["engine_fused_first_call_s"] = first_fused
        if not a.skip_hf:
            best = max(r["tokens_per_s"] for r in rows if r["engine"].startswith("miles"))
            speedup = best / next(r["tokens_per_s"] for r in rows if r["engine"] == "HF generate")
            report.summary.update(speedup_vs_hf=speedup, target_speedup=10.0, meets_target=speedup >= 10.0)
        report.notes.append(
            "tokens/s = generated tokens / wall time of one batch (prefill included), after an "
            "untimed warm-up batch of the same shape (the engine's first call, graph capture "
            "included, is engine_first_call_s); roofline = batch * bandwidth / weight bytes per "
            "decode step"
        )
        report.print(["engine", "seconds", "tokens", "tokens_per_s", "of_roofline"])
        if a.json_out:
            report.write_json(a.json_out)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0
