"""Parallel runs (pytest-xdist, ``-n``): tests that share one external thing run in one worker.

``scripts/test`` runs the suite with ``-n 2 --dist loadgroup``; a plain ``pytest tests/...`` runs in one process as
before. Under ``--dist loadgroup`` every test of one ``xdist_group`` goes to the same worker, one after another:

- ``slurm``: the tests marked ``slurm`` share the one local Slurm cluster (``slurm/local-cluster.sh``, fixed
  daemon ports and state under ``/tmp/miles-slurm``), started by a session fixture that would otherwise start in
  two workers at once; they also fill its four nodes, so two at a time would queue each other's jobs.
- ``sglang``: the real SGLang servers of ``tests/sglang`` (several GiB of memory each); one worker at a time keeps
  two of them from starting together on a small CI machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SGLANG_TESTS = Path(__file__).resolve().parent / "sglang"


def _group(item: pytest.Item) -> str | None:
    if item.get_closest_marker("slurm") is not None:
        return "slurm"
    if SGLANG_TESTS in Path(str(item.path)).resolve().parents:
        return "sglang"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        group = _group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
