"""One decode step of the embedded engine's static decoder, timed and profiled: where a rollout's time goes.

``miles bench rollout`` times whole batches; this looks inside one step at the
same shape. It builds the model (random weights) on the device, prefills a
batch, then times ``StaticDecoder.step`` with and without CUDA graphs at
slot positions that select different attention windows, and finally launches
one step eagerly under the torch profiler and prints the kernels that took
the most device time (matmuls, attention, sampling, norms ...).

    python -m miles.bench.decode_step --preset qwen2.5-0.5b --batch 256 --fuse on --top 16

Decoder imports happen inside :func:`main`, so reading this module's options
(the case registry's test does) needs neither torch nor a GPU.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

from miles.bench.report import machine, write_atomic
from miles.bench.shapes import PRESETS, hf_config, load_config_dict, with_layers
from miles.engine.decoder import StaticDecoder
from miles.engine.sampling import BatchSampling, SamplingParams
from miles.errors import UserError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m miles.bench.decode_step", description=__doc__.split("\n\n")[0].replace("``", "")
    )
    p.add_argument("--config", help="HF config.json (or its directory) of the model (random weights)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-0.5b", help="a known model shape")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--device", default=None, help="default cuda:0 if CUDA is available, else cpu")
    p.add_argument("--batch", type=int, default=256, help="rows decoded together (default 256)")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=128, help="decode budget per row (sets the workspace size)")
    p.add_argument(
        "--positions",
        type=int,
        nargs="+",
        default=[100, 150],
        help="slot positions to time a step at; each picks the attention window that covers it",
    )
    p.add_argument("--repeat", type=int, default=20, help="timed steps per position")
    p.add_argument(
        "--fuse",
        choices=["off", "on", "auto"],
        default="on",
        help="the fused step (compiled elementwise chains and sampling; CUDA with Triton)",
    )
    p.add_argument("--top", type=int, default=14, help="kernels listed from the profiled eager step")
    p.add_argument("--json", dest="json_out", default=None, help="also write the figures as JSON to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    a = parser().parse_args(argv)
    length = a.prompt_len + a.new_tokens
    if any(not 0 < pos < length for pos in a.positions):
        raise UserError(f"--positions must lie in 1..{length - 1} (prompt length + new tokens)")
    device = torch.device(a.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    fuse = {"off": False, "on": True, "auto": None}[a.fuse]
    data = load_config_dict(a.config, None if a.config else a.preset)
    if a.layers is not None:
        data = with_layers(data, a.layers)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a CPU init of 0.5B parameters takes seconds
        model = AutoModelForCausalLM.from_config(hf_config(data))
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    vocab = int(model.config.vocab_size)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(a.prompt_len)] for _ in range(a.batch)]
    params = [
        SamplingParams(max_new_tokens=a.new_tokens, temperature=1.0, ignore_eos=True, sampling_seed=i)
        for i in range(a.batch)
    ]
    sampling = BatchSampling.build(params, list(range(a.batch)), [a.new_tokens] * a.batch, set(), vocab, a.new_tokens)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    rows_out: list[dict[str, Any]] = []
    kernels: list[dict[str, Any]] = []
    with torch.inference_mode():
        for graphs in (True, False) if cuda else (False,):
            dec = StaticDecoder(model, device, cuda_graphs=graphs, fuse=fuse)
            sync()
            t = time.perf_counter()
            rows, _ = dec.start(prompts, sampling, length, [False] * a.batch)
            sync()
            prefill_ms = (time.perf_counter() - t) * 1e3
            for pos in a.positions:  # graphs captured (and kernels compiled) outside the timing
                dec.step(rows, pos)
            sync()
            for pos in a.positions:
                t = time.perf_counter()
                for _ in range(a.repeat):
                    dec.step(rows, pos)
                sync()
                ms = (time.perf_counter() - t) / a.repeat * 1e3
                rows_out.append(
                    {
                        "cuda_graphs": graphs,
                        "fused": dec.fusion.on,
                        "position": pos,
                        "step_ms": ms,
                        "tokens_per_s": rows / ms * 1e3,
                        "prefill_ms": prefill_ms,
                    }
                )
                print(
                    f"step b={rows} position={pos} graphs={graphs} fused={dec.fusion.on}: {ms:.3f} ms "
                    f"({rows / ms * 1e3:,.0f} tok/s); prefill {prefill_ms:.1f} ms",
                    flush=True,
                )
            del dec
            if cuda:
                torch.cuda.empty_cache()
        dec = StaticDecoder(model, device, cuda_graphs=False, fuse=fuse)
        rows, _ = dec.start(prompts, sampling, length, [False] * a.batch)
        last = max(a.positions)
        dec.step(rows, last)
        sync()
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            dec.step(rows, last)
            sync()
    kind = "CUDA" if cuda else "CPU"
    events = [e for e in prof.key_averages() if e.device_type.name == kind]
    total_ms = sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in events) / 1e3
    count = sum(e.count for e in events)
    print(f"eager step at position {last}: {count} {kind} kernels/ops, {total_ms:.3f} ms", flush=True)
    for e in sorted(events, key=lambda e: -(e.self_device_time_total if cuda else e.self_cpu_time_total))[: a.top]:
        ms = (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3
        kernels.append({"name": e.key, "ms": ms, "count": e.count})
        print(f"  {ms:8.3f} ms x{e.count:4d}  {e.key[:90]}", flush=True)
    if a.json_out:
        report = {
            "suite": "decode_step",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(str(device)),
            "settings": {k: v for k, v in vars(a).items() if k != "json_out"},
            "rows": rows_out,
            "summary": {"eager_kernels": count, "eager_ms": total_ms},
            "kernels": kernels,
        }
        write_atomic(Path(a.json_out), json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(main())
    except UserError as err:
        print(f"decode_step: error: {err}", file=sys.stderr)
        sys.exit(2)
