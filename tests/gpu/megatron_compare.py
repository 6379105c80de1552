"""Compare what ``megatron_gpu_worker.py`` wrote: FSDP vs Megatron, and the round trips.

``python megatron_compare.py OUT_DIR`` prints one line per scenario and writes
``OUT_DIR/summary.json``; the GPU test asserts on the same numbers.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative difference ``||a - b|| / ||b||`` in float64."""
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).norm() / b64.norm().clamp(min=1e-30))


DEGENERATE = ("k_proj.bias",)
"""Tensors whose exact gradient is zero (a key bias shifts every score of a query equally; softmax ignores it):
Adam turns their float noise into full-size steps, so they are compared by absolute difference only."""


ZERO_START = ("q_proj.bias", "v_proj.bias")
"""Tensors HF initialises to zero: after the test's two steps they are two Adam updates and nothing else, so their
relative difference is that of the updates themselves, where Adam's ``m / sqrt(v)`` magnifies the rounding of small
gradients. Reported as ``zero_start_rel_max`` with their own bound (measured up to 1.5e-5 in fp32)."""


def equiv_summary(res: dict[str, Any]) -> dict[str, Any]:
    f, m = res["fsdp"], res["megatron"]
    lp = max(rel(torch.cat(m["old_logprobs"]), torch.cat(f["old_logprobs"])) for _ in [0])
    losses = [(a["loss"], b["loss"]) for a, b in zip(m["metrics"], f["metrics"], strict=True)]
    loss_rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in losses)
    norms = [(a["grad_norm"], b["grad_norm"]) for a, b in zip(m["metrics"], f["metrics"], strict=True)]
    names_equal = sorted(m["weights"]) == sorted(f["weights"])
    w_rel = {k: rel(m["weights"][k], f["weights"][k]) for k in f["weights"] if k in m["weights"]}
    regular = {k: v for k, v in w_rel.items() if not k.endswith(DEGENERATE + ZERO_START)}
    zero_start = {k: v for k, v in w_rel.items() if k.endswith(ZERO_START)}
    w_abs = max(float((m["weights"][k] - f["weights"][k]).abs().max()) for k in w_rel)
    worst = max(regular, key=lambda k: regular[k])
    return {
        "world": res["world"],
        "device": res["device"],
        "logprob_rel": lp,
        "losses": losses,
        "loss_rel": loss_rel,
        "grad_norms": norms,
        "names_equal": names_equal,
        "weights_rel_max": regular[worst],
        "weights_rel_worst": worst,
        "weights_abs_max": w_abs,
        "zero_start_rel_max": max(zero_start.values(), default=0.0),
        "megatron_train_s": m["train_s"],
        "fsdp_train_s": f["train_s"],
    }


def summarize(out_dir: str) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for fname in sorted(os.listdir(out_dir)):
        if not fname.endswith(".pt"):
            continue
        res = torch.load(os.path.join(out_dir, fname), weights_only=False)
        name = fname[:-3]
        if name == "roundtrip":
            summary[name] = {k: v for k, v in res.items() if isinstance(v, dict)}
        else:
            summary[name] = equiv_summary(res)
    return summary


if __name__ == "__main__":
    s = summarize(sys.argv[1])
    with open(os.path.join(sys.argv[1], "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(s, fh, indent=1, default=str)
    for k, v in s.items():
        if k == "roundtrip":
            for fam, r in v.items():
                print(f"roundtrip {fam}: {r['tensors']} tensors, mismatched {len(r['mismatched'])}, extra {r['extra']}")
        else:
            print(
                f"{k}: logprob_rel {v['logprob_rel']:.2e} loss_rel {v['loss_rel']:.2e} weights_rel_max "
                f"{v['weights_rel_max']:.2e} ({v['weights_rel_worst']}) zero-start q/v bias "
                f"{v['zero_start_rel_max']:.2e} "
                f"abs {v['weights_abs_max']:.2e} "
                f"losses {v['losses']} grad_norms {v['grad_norms']} t_mcore {v['megatron_train_s']:.2f}s "
                f"t_fsdp {v['fsdp_train_s']:.2f}s"
            )
