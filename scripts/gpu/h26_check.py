"""H26 GPU check: the static decode path (CUDA graphs) against eager and HF's forward, then a step profile.

Prints lines starting with "H26" (grep them). Every section is guarded so one failure leaves the others.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from miles.bench.rollout import write_model_dir
from miles.bench.shapes import load_config_dict, with_layers
from miles.engine.decoder import StaticDecoder
from miles.engine.core import Engine, GenerationRequest
from miles.engine.sampling import BatchSampling, SamplingParams

DEV = os.environ.get("H26_DEV", "cuda:0")
SMALL = os.environ.get("H26_SMALL") == "1"  # a CPU dry run of this script
FUSE = os.environ.get("H26_FUSE") == "1"  # profile the fused decode step (torch.compile, CUDA only)


def sync() -> None:
    if DEV.startswith("cuda"):
        torch.cuda.synchronize()


def requests(vocab: int, n: int) -> list[GenerationRequest]:
    rng = random.Random(1)
    out = []
    for i in range(n):
        kw: dict = dict(max_new_tokens=rng.randrange(1, 6 if SMALL else 48), temperature=rng.choice([0.0, 0.0, 0.8, 1.0]),
                        sampling_seed=100 + i)
        if i % 3 == 0:
            kw.update(top_k=rng.choice([-1, 20]), top_p=rng.choice([1.0, 0.9]))
        if i % 4 == 0:
            kw.update(stop_token_ids=[rng.randrange(3, vocab)], min_new_tokens=min(2, kw["max_new_tokens"]))
        else:
            kw.update(ignore_eos=True)
        ids = [rng.randrange(3, vocab) for _ in range(rng.randrange(2, 6 if SMALL else 40))]
        out.append(GenerationRequest(ids, SamplingParams(**kw), logprob_start_len=0 if i % 5 == 0 else -1))
    return out


def compare(name: str, a: list, b: list) -> None:
    same = sum(x.output_ids == y.output_ids for x, y in zip(a, b, strict=True))
    lp = max((abs(p - q) for x, y in zip(a, b, strict=True) if x.output_ids == y.output_ids
              for p, q in zip(x.output_logprobs, y.output_logprobs, strict=True)), default=0.0)
    prefix = sum(next((k for k, (s, t) in enumerate(zip(x.output_ids, y.output_ids, strict=False)) if s != t),
                      min(len(x.output_ids), len(y.output_ids))) for x, y in zip(a, b, strict=True))
    total = sum(len(x.output_ids) for x in a)
    print(f"H26 {name}: rows equal {same}/{len(a)}, common-prefix tokens {prefix}/{total}, "
          f"max |logprob diff| on equal rows {lp:.2e}", flush=True)


def correctness(tmp: Path) -> None:
    for dtype in ("float32",) if SMALL else ("float32", "bfloat16"):
        data = with_layers(load_config_dict(None, "qwen2.5-0.5b"), 1 if SMALL else 4)
        mdir = write_model_dir(data, tmp / f"m-{dtype}", dtype)
        eng = Engine(mdir, device=DEV, dtype=dtype, seed=0, max_batch_size=64)
        reqs = requests(eng.vocab_size, 6 if SMALL else 40)
        t = time.perf_counter()
        graphs = eng.generate(reqs)
        t_first = time.perf_counter() - t
        again = eng.generate(reqs)
        assert eng.decoder is not None and (eng.decoder.cuda_graphs or SMALL)
        graph_keys = len(eng.decoder.ws.graphs) if eng.decoder.ws else 0
        graph_dec = eng.decoder
        eng.decoder = StaticDecoder(eng.model, eng.device, cuda_graphs=False)
        eager = eng.generate(reqs)
        eng.decoder = None
        hf = eng.generate(reqs)
        eng.decoder = graph_dec
        print(f"H26 {dtype}: first call {t_first:.2f}s, graphs captured {graph_keys}", flush=True)
        compare(f"{dtype} graphs vs graphs again (reproducible)", graphs, again)
        compare(f"{dtype} graphs vs eager static", graphs, eager)
        compare(f"{dtype} graphs vs HF forward", graphs, hf)
        fin = [o.finish_reason["type"] for o in graphs]
        print(f"H26 {dtype}: finish reasons {dict((k, fin.count(k)) for k in set(fin))}", flush=True)
        del eng, graph_dec
        torch.cuda.empty_cache()


def profile() -> None:
    from transformers import AutoModelForCausalLM

    from miles.bench.shapes import hf_config

    data = load_config_dict(None, "qwen2.5-0.5b")
    if SMALL:
        data = with_layers(data, 1)
    torch.manual_seed(0)
    with torch.device(DEV):  # initialise on the device: a CPU init of 0.5B parameters takes seconds
        model = AutoModelForCausalLM.from_config(hf_config(data))
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    b, plen, steps = (4, 8, 8) if SMALL else (256, 32, 128)
    vocab = model.config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(plen)] for _ in range(b)]
    params = [SamplingParams(max_new_tokens=steps, temperature=1.0, ignore_eos=True, sampling_seed=i) for i in range(b)]
    s = BatchSampling.build(params, list(range(b)), [steps] * b, set(), vocab, steps)
    with torch.inference_mode():
        for graphs in ((True, False) if DEV.startswith("cuda") else (False,)):
            dec = StaticDecoder(model, torch.device(DEV), cuda_graphs=graphs, fuse=FUSE)
            sync()
            t = time.perf_counter()
            rows, _ = dec.start(prompts, s, plen + steps, [False] * b)
            sync()
            t_prefill = time.perf_counter() - t
            for window_pos in (100, 150):  # both windows (128, 256), graphs captured outside the timing
                dec.step(rows, window_pos)
            sync()
            for window_pos in (100, 150):
                t = time.perf_counter()
                for _ in range(20):
                    dec.step(rows, window_pos)
                sync()
                ms = (time.perf_counter() - t) / 20 * 1e3
                print(f"H26 step b={rows} window_for_pos={window_pos} graphs={graphs}: {ms:.3f} ms "
                      f"({rows / ms * 1e3:,.0f} tok/s); prefill {t_prefill * 1e3:.1f} ms", flush=True)
            del dec
            torch.cuda.empty_cache()
        dec = StaticDecoder(model, torch.device(DEV), cuda_graphs=False, fuse=FUSE)
        rows, _ = dec.start(prompts, s, plen + steps, [False] * b)
        dec.step(rows, 150)
        sync()
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CUDA if DEV.startswith("cuda") else ProfilerActivity.CPU]) as p:
            dec.step(rows, 150)
            sync()
        events = [e for e in p.key_averages() if e.device_type.name == ("CUDA" if DEV.startswith("cuda") else "CPU")]
        total = sum(e.self_device_time_total for e in events)
        count = sum(e.count for e in events)
        print(f"H26 eager step kernels: {count}, GPU time {total / 1e3:.3f} ms", flush=True)
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:int(os.environ.get("H26_TOP", "14"))]:
            print(f"H26   {e.self_device_time_total / 1e3:8.3f} ms x{e.count:4d}  {e.key[:90]}", flush=True)


def main() -> int:
    name = torch.cuda.get_device_name(0) if DEV.startswith("cuda") else "cpu"
    print(f"H26 torch {torch.__version__}, device {name}", flush=True)
    import transformers

    print(f"H26 transformers {transformers.__version__}", flush=True)
    rc = 0
    with tempfile.TemporaryDirectory() as tmp:
        sections = [lambda: correctness(Path(tmp)), profile] if os.environ.get("H26_ONLY") != "profile" else [profile]
        for section in sections:
            try:
                section()
            except Exception:
                traceback.print_exc()
                print("H26 SECTION FAILED", flush=True)
                rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
