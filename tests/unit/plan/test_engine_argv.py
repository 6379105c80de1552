"""``miles plan`` shows each engine's exact command line, from the same function the launcher runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from miles.plan import make_plan, render_table
from miles.plan.engine_argv import plan_argvs
from miles.sglang import launcher as sglang_launcher
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
