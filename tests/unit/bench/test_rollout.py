"""``miles bench rollout`` on CPU: the embedded engine and HF generate on the same tiny model."""

from __future__ import annotations

from pathlib import Path

import torch

from miles.bench import main

from .conftest import load_report, positive_finite


def test_rollout_compares_engine_hf_and_roofline(tiny_config: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "rollout.json"
    assert (
        main(
            "rollout",
            [
                "--config",
                str(tiny_config),
                "--batch",
                "3",
                "--prompt-len",
                "5",
                "--max-new-tokens",
                "6",
                "--json",
                str(out),
            ],
        )
        == 0
    )
    report = load_report(out, "rollout")
    engines = [r["engine"] for r in report["rows"]]
    assert engines == ["miles embedded", "HF generate", "roofline (weights only)"]
    for row in report["rows"][:2]:
        assert row["tokens"] == 3 * 6  # EOS ignored: every row generates max_new_tokens
        assert positive_finite(row["seconds"]) and positive_finite(row["tokens_per_s"])
    s = report["summary"]
    assert s["mem_bw_source"].startswith("measured") and positive_finite(s["mem_bw_gbs"])
    assert (
        abs(s["roofline_tokens_per_s"] - 3 * s["mem_bw_gbs"] * 1e9 / s["weight_bytes"])
        < 1e-6 * s["roofline_tokens_per_s"]
    )
    assert abs(s["speedup_vs_hf"] - report["rows"][0]["tokens_per_s"] / report["rows"][1]["tokens_per_s"]) < 1e-9
