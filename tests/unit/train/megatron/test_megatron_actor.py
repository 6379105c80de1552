"""The Megatron backend on CPU over gloo (worlds 2 and 4), against HF transformers and the FSDP backend.

One launch of ``megatron_worker.py`` on 2 ranks runs most scenarios, one on 4
ranks the TP x CP and PP x CP layouts; the tests below check their results:

* round trip HF -> Megatron -> HF, bit for bit, for every family at TP=2
  (Qwen3-MoE at TP=2 x EP=2), and log-probs / entropies equal to HF's;
* FSDP (DP=2) vs Megatron TP=2, PP=2, CP=2, TP=2 + sequence parallelism and
  Qwen3-MoE at TP=2 + sequence parallelism (and on 4 ranks TP=2 x CP=2 + SP,
  PP=2 x CP=2) on the same model and rollout:
  log-probs, per-step losses, gradient norms and updated weights;
* packed micro-batches (``[train] qkv_format = "thd"``: miles' per-document attention, RoPE restarting per
  document) against padded ones at TP=2 + sequence parallelism and PP=2;
* dist_checkpointing save / load / resume, bit for bit; without the optimizer (``no_save_optim``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.unit.train.tiny_model import assert_layouts_agree

pytest.importorskip("megatron.core", reason="megatron-core is the [megatron] extra; scripts/test installs it")

HERE = Path(__file__).resolve().parent
SCENARIOS = [
    "roundtrip",
    "equiv_tp2",
    "equiv_pp2",
    "equiv_cp2",
    "equiv_sp",
    "equiv_moe_sp",
    "resume",
    "resume_cp2",
    "resume_no_optim",
    "offload",
    "fused",
    "packing",
]
SCENARIOS_WORLD4 = ["equiv_tp2cp2", "equiv_pp2cp2"]
FP32_TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(world: int, scenarios: list[str], out: Path, work: Path) -> dict[str, Any]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / "megatron_worker.py"), str(out), str(work), *scenarios],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    for p in procs:
        stdout, _ = p.communicate(timeout=540)
        logs.append(stdout)
    if any(p.returncode for p in procs):
        pytest.fail("megatron worker failed:\n" + "\n".join(log[-4000:] for log in logs))
    return {s: torch.load(out / f"{s}.pt", weights_only=False) for s in scenarios}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("megatron-out")
    work = tmp_path_factory.mktemp("megatron-work")
    res = _launch(2, SCENARIOS, out, work)
    res.update(_launch(4, SCENARIOS_WORLD4, out, work))
    return res


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


EPS32 = torch.finfo(torch.float32).eps
MEANS = ("loss", "pg_loss", "entropy", "kl_loss")
"""Step metrics that are means over the step's tokens."""


def _metrics_agree(a: dict[str, float], b: dict[str, float], logprob_scale: float) -> None:
    """One optimizer step's metrics of two backends, equal up to what float32 rounding allows.

    Each of ``MEANS`` is a mean over the step's ``train_tokens`` tokens of per-token terms no larger than
    ``logprob_scale`` (the largest |log-prob|: a KL term is a difference of two log-probs, an entropy at most
    log V, a policy-gradient term an O(1) normalized advantage times a ratio near 1). The two backends sum
    those terms in other orders (TP splits the vocabulary sums, CP and SP the token sums, PP the layers), and
    the float32 sum of T terms of size M moves by at most T * eps32 * M when its order changes (the
    recursive-summation bound), however small the mean: a KL near 1e-3 from log-probs near -4.5 may move
    by far more than 1e-5 of itself. grad_norm is a norm of the whole gradient, not a mean: it is compared
    relatively.
    """
    floor = a["train_tokens"] * EPS32 * max(logprob_scale, 1.0)
    for key in MEANS:
        bound = max(FP32_TOL * abs(b[key]), floor)
        assert abs(a[key] - b[key]) <= bound, (key, a[key], b[key], bound)
    assert abs(a["grad_norm"] - b["grad_norm"]) <= FP32_TOL * abs(b["grad_norm"]), (a["grad_norm"], b["grad_norm"])


def _logprob_scale(run: dict[str, Any]) -> float:
    return float(max(torch.cat(run["old_logprobs"]).abs().max(), torch.cat(run["ref_logprobs"]).abs().max()))


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama", "qwen3_moe"])
def test_roundtrip_is_bit_identical_and_logprobs_match_hf(results: dict[str, Any], family: str) -> None:
    r = results["roundtrip"][family]
    assert r["names"] == r["hf_names"]
    assert r["mismatched"] == []
    assert _rel(r["lp"], r["ref_lp"]) < FP32_TOL
    assert _rel(r["ent"], r["ref_ent"]) < FP32_TOL


def test_sdpa_attention_matches_hf_and_unfused_gradients(results: dict[str, Any]) -> None:
    r = results["roundtrip"]
    assert r["qwen3_sdpa"]["core"] == "SdpaAttention" and r["qwen3_unfused"]["core"] == "DotProductAttention"
    assert _rel(r["qwen3_sdpa"]["lp"], r["qwen3_hf_lp"]) < FP32_TOL
    assert _rel(r["qwen3_sdpa"]["lp"], r["qwen3_unfused"]["lp"]) < FP32_TOL
    assert r["sdpa_grad_rel"] < FP32_TOL


def test_bf16_pipeline_export_keeps_checkpoint_dtype(results: dict[str, Any]) -> None:
    r = results["roundtrip"]["qwen3_pp2_bf16"]
    assert r["names"] == r["hf_names"]
    assert r["dtypes"] == ["torch.bfloat16"]
    assert r["mismatched"] == []


# A key bias moves every score of a query by the same amount, which softmax ignores: its exact gradient is 0 and
# Adam turns float noise into full-size steps in *both* backends. Those tensors are checked by absolute difference.
DEGENERATE = ("k_proj.bias",)


PARALLEL = {
    "equiv_tp2": (1, False),
    "equiv_pp2": (1, False),
    "equiv_cp2": (2, False),
    "equiv_sp": (1, True),
    "equiv_moe_sp": (1, True),
    "equiv_tp2cp2": (2, True),
    "equiv_pp2cp2": (2, False),
}
"""(context_parallel_size, sequence_parallel) each scenario's Megatron model must have been built with."""


@pytest.mark.parametrize("scenario", list(PARALLEL))
def test_megatron_step_equals_fsdp_step(results: dict[str, Any], scenario: str) -> None:
    """One rollout (2 optimizer steps) of FSDP (DP=2) vs Megatron: TP=2, PP=2, CP=2 (miles' context-parallel
    attention, sequences split in 2 x 2 chunks), TP=2 with sequence parallelism, Qwen3-MoE at TP=2 + SP, and on 4
    ranks (FSDP DP=4) TP=2 x CP=2 with sequence parallelism and PP=2 x CP=2."""
    f, m = results[scenario]["fsdp"], results[scenario]["megatron"]
    assert m["parallel"] == PARALLEL[scenario]
    for name in ("old_logprobs", "ref_logprobs"):
        assert _rel(torch.cat(m[name]), torch.cat(f[name])) < FP32_TOL, name
    assert len(m["metrics"]) == len(f["metrics"]) == 2
    for a, b in zip(m["metrics"], f["metrics"], strict=True):
        assert a["lr"] == b["lr"] and a["train_tokens"] == b["train_tokens"]
        _metrics_agree(a, b, _logprob_scale(f))
    assert sorted(m["weights"]) == sorted(f["weights"])
    for name, w in f["weights"].items():
        assert float((m["weights"][name] - w).abs().max()) < 1e-5, name
        if not name.endswith(DEGENERATE):
            assert _rel(m["weights"][name], w) < _weight_bound(w, f["metrics"]), name


REDUCTION_PATH = 2 * (32 + 64 + 12) + 95 + 32
"""Length of the float32 reductions one gradient term passes through before the token sum, for the tiny models of
``megatron_worker.write_family``: per layer (2) the hidden (32), MLP (64) and attention (12 tokens) contractions,
then the vocabulary's log-softmax (95) and the final hidden (32)."""


def _weight_bound(w: torch.Tensor, metrics: list[dict[str, float]]) -> float:
    """How far two backends' weights may drift apart, relative to the weight, after their Adam steps.

    Adam normalises each gradient element, so a gradient computed to relative error ``delta`` moves the update
    by about ``lr * delta`` per element and step. ``delta`` is the float32 summation error of a reduction over
    the step's tokens (``train_tokens * eps32``, the recursive-summation bound); over ``numel`` elements that is
    ``lr * delta * sqrt(numel)`` in norm. Each term of that sum already carries the rounding of the contractions it
    came through (``REDUCTION_PATH``), so ``delta`` counts those too. Small tensors that see few tokens (an expert)
    reach that bound; the floor is the float32 tolerance every other comparison uses.
    """
    drift = sum(m["lr"] * (m["train_tokens"] + REDUCTION_PATH) * EPS32 for m in metrics) * w.numel() ** 0.5
    return max(FP32_TOL, drift / float(w.double().norm()))


def test_fused_kernels_match_default_spec_and_fsdp_step(results: dict[str, Any]) -> None:
    """``[perf] fused_kernels`` + SDPA: same log-probs, entropies and gradients as the default spec at TP=2, and a
    GRPO step (chunked log-probs, miles' norms) equal to the FSDP backend's."""
    r = results["fused"]
    assert r["fused"]["norms"] == ["miles.train.megatron.norm.RMSNorm"]
    assert r["plain"]["norms"] == ["torch.nn.modules.normalization.RMSNorm"]
    assert _rel(r["fused"]["lp"], r["plain"]["lp"]) < FP32_TOL
    assert _rel(r["fused"]["ent"], r["plain"]["ent"]) < FP32_TOL
    assert sorted(r["fused"]["grads"]) == sorted(r["plain"]["grads"])
    for name, g in r["plain"]["grads"].items():
        assert _rel(r["fused"]["grads"][name], g) < FP32_TOL, name
    f, m = results["equiv_tp2"]["fsdp"], r["megatron"]
    assert _rel(torch.cat(m["old_logprobs"]), torch.cat(f["old_logprobs"])) < FP32_TOL
    for a, b in zip(m["metrics"], f["metrics"], strict=True):
        _metrics_agree(a, b, _logprob_scale(f))
    for name, w in f["weights"].items():
        assert float((m["weights"][name] - w).abs().max()) < 1e-5, name


@pytest.mark.parametrize("layout", ["tp2sp", "pp2"])
def test_packed_micro_batches_equal_padded_ones(results: dict[str, Any], layout: str) -> None:
    """Four samples per micro-batch, packed into one row (miles' per-sequence attention, RoPE restarting per sequence)
    vs right-padded: log-probs and entropies (TP=2 + SP), old log-probs, the step's metrics and this rank's
    gradients within the float32 reordering bounds of :func:`tests.unit.train.tiny_model.assert_layouts_agree`."""
    assert_layouts_agree(results["packing"][f"{layout}_bshd"], results["packing"][f"{layout}_thd"])


@pytest.mark.parametrize("scenario", ["resume", "resume_cp2"])
def test_dist_checkpoint_resume_is_bit_identical(results: dict[str, Any], scenario: str) -> None:
    """TP=2, and CP=2: the step after a load is the uninterrupted run's, bit for bit."""
    r = results[scenario]
    assert r["step_after_load"] == 2
    m_a, m_b = r["metrics"]
    for a, b in zip(m_a, m_b, strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    w_a, w_b = r["weights"]
    assert sorted(w_a) == sorted(w_b)
    for name in w_a:
        assert torch.equal(w_a[name], w_b[name]), name


def test_no_save_optim_leaves_the_optimizer_out_and_restarts_adam(results: dict[str, Any]) -> None:
    """The checkpoint holds no optimizer file and says so; the load restores weights and step (the first loss
    after it is the straight run's) while Adam's moments start again (the update, hence the weights, differ)."""
    full, lean = results["resume"], results["resume_no_optim"]
    assert "no_optimizer" in lean["files"] and "no_optimizer" not in full["files"]
    assert not any(f.startswith("adamw.") for f in lean["files"]) and any(f.startswith("adamw.") for f in full["files"])
    assert lean["step_after_load"] == 2
    (a, *_), (b, *_) = lean["metrics"]
    assert a["loss"] == b["loss"]
    w_a, w_b = lean["weights"]
    assert any(not torch.equal(w_a[name], w_b[name]) for name in w_a)


def test_offload_releases_storage_and_training_continues_exactly(results: dict[str, Any]) -> None:
    r = results["offload"]
    assert r["released"] > 0 and set(r["freed_bytes"]) == {0}, "every parameter's storage was released"
    (m_plain, w_plain), (m_off, w_off) = r["runs"]
    assert [m["loss"] for m in m_plain] == [m["loss"] for m in m_off]
    for name in w_plain:
        assert torch.equal(w_plain[name], w_off[name]), name
