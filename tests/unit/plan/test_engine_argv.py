"""``miles plan`` shows each engine's exact command line, from the same function the launcher runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from miles.plan import make_plan, render_table
from miles.plan.engine_argv import EMBEDDED_GPU_BATCH, REQUEST_CHUNK, embedded_argv, plan_argvs, request_chunk
from miles.sglang import launcher as sglang_launcher
from miles.spec.tables import RolloutConfig, Spec
from tests.unit.plan.plan_specs import cpu_spec, spec


def _with_flags():  # type: ignore[no-untyped-def]
    s = spec("split")
    return dataclasses.replace(
        s,
        sglang=dataclasses.replace(
            s.sglang, mem_fraction_static=0.7, server_args={"chunked_prefill_size": 4096, "enable_memory_saver": True}
        ),
    )


def test_plan_table_shows_every_engines_sglang_command_with_pass_through_flags() -> None:
    s = _with_flags()
    plan = make_plan(s, job_id=7)
    text = render_table(s, plan)
    lines = [line for line in text.splitlines() if "sglang.launch_server" in line]
    assert len(lines) == len(plan.engines) == 4
    for e, line in zip(plan.engines, lines, strict=True):
        assert f"--port {plan.ports.engine_http[e.index]}" in line
        assert f"--nccl-port {plan.ports.engine_nccl[e.index]}" in line
        assert "--chunked-prefill-size 4096 --enable-memory-saver" in line
        assert "--mem-fraction-static 0.7" in line and "--tp-size 2" in line
        assert f"--random-seed {s.rollout.rollout_seed + e.index}" in line


def test_the_plan_shows_what_the_launcher_runs() -> None:
    s = _with_flags()
    plan = make_plan(s)
    shown = plan_argvs(s, plan)
    launched = sglang_launcher.plan_launches(
        s,
        plan,
        model_path=s.model.hf_checkpoint,
        api_key="the job's key",
        log_dir=Path("/tmp"),
        host="0.0.0.0",
        python=s.slurm.python,
    )
    assert shown == [list(launch.argv) for launch in launched]


def test_embedded_engines_show_miles_server_with_the_builtin_model_directory() -> None:
    s = cpu_spec("colocate", model={"hf_checkpoint": "", "builtin": "tiny-arith"})
    plan = make_plan(s)
    (argv, *_) = plan_argvs(s, plan)
    assert argv[:3] == [s.slurm.python, "-m", "miles.engine.server"]
    assert argv[argv.index("--model") + 1] == f"{plan.run_dir}/model"
    assert argv[argv.index("--device") + 1] == "cpu"
    assert "miles.engine.server" in render_table(s, plan)
    assert "--max-batch-size" not in argv  # the server's own default on CPUs


def test_a_gpu_rollout_goes_to_the_embedded_engines_in_one_batch_each() -> None:
    # 32 prompts x 8 samples over one engine: one request of 256 rows; over three: 86, 86, 84 rows.
    rollout = RolloutConfig(engine="embedded", rollout_batch_size=32, n_samples_per_prompt=8)
    s = Spec(rollout=rollout)
    assert request_chunk(s, "cuda", 1) == 256 == EMBEDDED_GPU_BATCH
    assert request_chunk(s, "cuda", 3) == 86
    # more rows than the engine decodes at once: cut at its batch; over-sampling rounds count as sent
    big = Spec(rollout=dataclasses.replace(rollout, over_sampling_batch_size=64))
    assert request_chunk(big, "cuda", 1) == EMBEDDED_GPU_BATCH and request_chunk(big, "cuda", 2) == 256
    assert request_chunk(big, "cuda", 4) == 128
    # CPUs and SGLang keep small requests (SGLang's scheduler batches across them)
    assert request_chunk(s, "cpu", 1) == REQUEST_CHUNK
    assert request_chunk(Spec(rollout=dataclasses.replace(rollout, engine="sglang")), "cuda", 1) == REQUEST_CHUNK


def test_the_embedded_engine_on_a_gpu_decodes_the_batch_the_client_sends() -> None:
    s = cpu_spec("colocate", model={"hf_checkpoint": "", "builtin": "tiny-arith"})
    argv = embedded_argv(s, model_path="/m", host="h", port=1, device="cuda")
    assert argv[argv.index("--max-batch-size") + 1] == str(EMBEDDED_GPU_BATCH)
