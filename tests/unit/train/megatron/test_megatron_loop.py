"""The whole GRPO loop with the Megatron backend at TP=2 on CPU: ``miles run`` of the quickstart.

The CPU proof of what ``tests/gpu/test_megatron_grpo.py`` runs on two GPUs:
``miles run configs/quickstart.toml`` with ``perf.backend = "megatron"`` and
``perf.tp = 2`` starts two trainer ranks (one TP group over gloo) and two
embedded engines; every rollout the Megatron actor's export (TP slices
all-gathered, HF names) is synced to both engines and checked bit for bit.

megatron-core needs CUDA calls pointed at the CPU (``cpu_shim.py``): a
``sitecustomize`` written here imports the shim into the trainer ranks that
``miles run`` starts, and nowhere else.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is the [megatron] extra; scripts/test installs it")

ROOT = Path(__file__).resolve().parents[4]
HERE = Path(__file__).resolve().parent
ROLLOUTS = 6

pytestmark = pytest.mark.slow

SITECUSTOMIZE = f"""\
import sys
if "--role" in sys.argv and "trainer" in sys.argv:  # trainer ranks of `miles run` only
    sys.path.insert(0, {str(HERE)!r})
    import cpu_shim  # noqa: F401
"""


def test_megatron_tp2_loop_syncs_every_rollout_and_learns(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "miles.cli",
        "run",
        str(ROOT / "configs" / "quickstart.toml"),
        "--set",
        f'run.run_dir="{run_dir}"',
        "--set",
        f"run.num_rollout={ROLLOUTS}",
        "--set",
        'perf.backend="megatron"',
        "--set",
        "perf.tp=2",
        "--set",
        "rollout.check_weight_sync=true",
        "--set",
        "run.use_tensorboard=false",
        "--set",
        "run.plot=false",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MILES_GRACE_S": "5",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p),
    }
    env.pop("MILES_FAULT", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]

    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["mesh"]["backend"] == "megatron" and plan["mesh"]["tp"] == 2 and plan["mesh"]["dp"] == 1
    verified = [line for line in out.splitlines() if "weight sync verified" in line]
    assert len(verified) == ROLLOUTS and all("on 2 engines" in line for line in verified), out[-5000:]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout_id"] for r in rows] == list(range(ROLLOUTS))
    assert [r["rollout/weight_version"] for r in rows] == [float(i + 1) for i in range(ROLLOUTS)]
    for r in rows:
        assert r["rollout/samples"] == 512 and r["train/train_tokens"] > 0
        assert math.isfinite(r["train/loss"]) and 0 < r["train/grad_norm"] < math.inf
    rewards = [r["rollout/reward_mean"] for r in rows]
    # Seeded and deterministic; measured 0.049 0.086 0.080 0.137 0.113 0.152 (40 rollouts reach ~0.8).
    assert statistics.fmean(rewards[:2]) <= 0.12, rewards
    assert statistics.fmean(rewards[-2:]) >= statistics.fmean(rewards[:2]) + 0.03, rewards

    # The exported final model is the trained one: it differs from the built-in it started from.
    from safetensors.torch import load_file

    start = load_file(str(run_dir / "model" / "model.safetensors"))
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    assert sorted(final) == sorted(start)
    assert any(not final[n].equal(start[n]) for n in final)
