"""The Megatron actor reads its micro-batches' metrics from the device once per optimizer step."""

from __future__ import annotations

import math

import torch

from miles.train.megatron.actor import _on_host


def test_every_figure_comes_back_in_its_place_as_a_python_number() -> None:
    store = [
        {"metrics": {"loss": torch.tensor(0.25), "ratio_max": torch.tensor(-math.inf)}, "tokens": torch.tensor(7)},
        {"metrics": {}, "tokens": 0},  # a dummy micro-batch (no samples on this DP rank)
        {"metrics": {"loss": torch.tensor(1.5, dtype=torch.float32), "n": 3.0}, "tokens": torch.tensor(2)},
    ]
    out = _on_host(store)
    assert out == [
        {"metrics": {"loss": 0.25, "ratio_max": -math.inf}, "tokens": 7},
        {"metrics": {}, "tokens": 0},
        {"metrics": {"loss": 1.5, "n": 3.0}, "tokens": 2},
    ]
    assert all(isinstance(v, float) for d in out for v in d["metrics"].values())
    assert all(type(d["tokens"]) is int for d in out)
    # float32 figures come back exactly as float() of the tensor gave them
    third = torch.tensor(1 / 3, dtype=torch.float32)
    assert _on_host([{"metrics": {"x": third}, "tokens": 1}])[0]["metrics"]["x"] == float(third)
