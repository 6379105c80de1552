"""``miles bench``: what miles gets out of the hardware, each figure against a same-run reference.

Suites (``miles bench SUITE --help`` lists each one's options):

* ``sync``: weight sync trainer -> engines vs a raw ``dist.broadcast`` of the same bytes;
* ``train``: actor tokens/s and MFU per backend (model FLOPs from the HF config);
* ``rollout``: embedded engine tokens/s vs HF ``generate`` and the decode memory roofline;
* ``loop``: per-phase wall time of real loop steps (``miles run``) and the overhead share.

Suites are imported lazily: importing this package does not import torch.
"""

from __future__ import annotations

import importlib

from miles.errors import UserError

SUITES = ("sync", "train", "rollout", "loop")


def main(suite: str, args: list[str]) -> int:
    """Run one suite with its command-line ``args``; returns the exit code."""
    if suite not in SUITES:
        raise UserError(f"unknown benchmark suite {suite!r}; choose one of {', '.join(SUITES)}")
    module = importlib.import_module(f"miles.bench.{suite}")
    return int(module.main(list(args)))


__all__ = ["SUITES", "main"]
