#!/usr/bin/env python3
"""How long `miles plan` takes for a 1024-node split job (a benchmark, not a test).

Builds the spec in code (no TOML file needed): 512 engine nodes (512 SGLang
engines of TP8) and 512 trainer nodes (4096 Megatron ranks, TP8 x PP8 x DP64,
EP64 over 256 experts), then times each planner stage, best of N runs:

    .venv/bin/python scripts/bench_plan.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from miles.plan import make_plan, render_script, render_table, to_json
from miles.spec.tables import (
    ClusterConfig,
    ModelConfig,
    PerfConfig,
    RolloutConfig,
    RunConfig,
    SglangConfig,
    Spec,
    TrainConfig,
)


def big_spec() -> Spec:
    return Spec(
        run=RunConfig(name="bench-1024", run_dir="/shared/runs/bench-1024", num_rollout=100),
        model=ModelConfig(hf_checkpoint="/shared/models/moe", num_layers=64, num_attention_heads=128,
                          num_key_value_heads=128, num_experts=256),
        rollout=RolloutConfig(engine="sglang", prompt_data="/d.jsonl", rm_type="math", rollout_batch_size=1024, n_samples_per_prompt=16),
        train=TrainConfig(global_batch_size=4096, num_steps_per_rollout=4, use_dynamic_batch_size=True, max_tokens_per_gpu=16384),
        perf=PerfConfig(backend="megatron", tp=8, pp=8, ep=64, etp=1, sequence_parallel=True),
        sglang=SglangConfig(rollout_num_gpus_per_engine=8),
        cluster=ClusterConfig(mode="split", gpus_per_node=8, actor_num_nodes=512, actor_num_gpus_per_node=8, rollout_num_nodes=512),
        source="bench-1024",
    )


def best_of(repeat: int, fn: Callable[[], object]) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    spec = big_spec()
    t_plan, plan = best_of(args.repeat, lambda: make_plan(spec, job_id=123456))
    assert plan is not None
    t_json, text = best_of(args.repeat, lambda: to_json(plan))  # type: ignore[arg-type]
    t_table, _ = best_of(args.repeat, lambda: render_table(spec, plan))  # type: ignore[arg-type]
    t_script, _ = best_of(args.repeat, lambda: render_script(spec, plan))  # type: ignore[arg-type]
    nodes = sum(c.nodes for c in plan.components)  # type: ignore[attr-defined]
    print(f"spec: {nodes} nodes, {plan.mesh.world_size} trainer ranks, {len(plan.engines)} engines")  # type: ignore[attr-defined]
    print(f"make_plan     {t_plan * 1000:8.1f} ms")
    print(f"to_json       {t_json * 1000:8.1f} ms   ({len(str(text)) / 1e6:.2f} MB of JSON)")
    print(f"render_table  {t_table * 1000:8.1f} ms")
    print(f"render_script {t_script * 1000:8.1f} ms")
    print(f"total         {(t_plan + t_json + t_table) * 1000:8.1f} ms  (make_plan + to_json + render_table: `miles plan` after loading)")
    # The whole command as a user types it: interpreter start, imports, strict TOML loading, planning, printing.
    from miles.spec import spec_to_toml

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench-1024.toml"
        path.write_text(spec_to_toml(spec))
        for flags in ([], ["--json"]):
            command = [sys.executable, "-m", "miles.cli", "plan", str(path), *flags]

            def run(command: list[str] = command) -> object:
                return subprocess.run(command, check=True, stdout=subprocess.DEVNULL)

            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            n = max(1, args.repeat // 2)
            t_cli, _ = best_of(n, run)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / n
            print(f"`miles plan {' '.join(flags)}`".ljust(20)
                  + f"{t_cli * 1000:8.1f} ms  wall (best of {n}), {cpu * 1000:.0f} ms CPU (mean): the whole process")


if __name__ == "__main__":
    main()
