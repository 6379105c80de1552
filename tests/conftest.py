"""Parallel runs (pytest-xdist, ``-n``): tests that share one external thing run in one worker.

``scripts/test`` runs the suite with ``-n 2 --dist loadgroup``; a plain ``pytest tests/...`` runs in one process as
before. Under ``--dist loadgroup`` every test of one ``xdist_group`` goes to the same worker, one after another:

- ``slurm``: the tests marked ``slurm`` share the one local Slurm cluster (``slurm/local-cluster.sh``, fixed
  daemon ports and state under ``/tmp/miles-slurm``), started by a session fixture that would otherwise start in
  two workers at once; they also fill its four nodes, so two at a time would queue each other's jobs.
- ``sglang``: the real SGLang servers of ``tests/sglang`` (several GiB of memory each); one worker at a time keeps
  two of them from starting together on a small CI machine.
- a test module's own path, for its tests that use a module-scoped fixture (a straight run, a Megatron launch, an
  engine): they share the one fixture value rather than each worker building it again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SGLANG_TESTS = Path(__file__).resolve().parent / "sglang"


def _uses_a_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    for name in info.names_closure:
        defs = info.name2fixturedefs.get(name)
        if defs and defs[-1].scope in ("module", "class", "package"):
            return True
    return False


def _group(item: pytest.Item) -> str | None:
    path = Path(str(item.path)).resolve()
    if item.get_closest_marker("slurm") is not None:
        return "slurm"
    if SGLANG_TESTS in path.parents:
        return "sglang"
    if _uses_a_module_fixture(item):
        return str(path.relative_to(ROOT)) if ROOT in path.parents else str(path)
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        group = _group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


def _group_in_node_id(item: pytest.Item) -> None:
    """What ``--dist loadgroup`` does in each worker: the group's name after the node id (``...::test@slurm``), the
    scope the scheduler keeps on one worker. pytest-xdist 3.8 sets ``item._nodeid``, which pytest 9.2 no longer
    reads (the id is ``item._id``, a ``NodeId``): without this every group would be spread over the workers."""
    names = sorted(
        {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
    )
    if not names:
        return
    suffix = "@" + "_".join(names)
    if item.nodeid.endswith(suffix):  # pytest-xdist did it
        return
    if hasattr(item, "_id"):
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(item.nodeid + suffix)
    else:
        item._nodeid = item.nodeid + suffix  # type: ignore[attr-defined]


class _Worker:
    """In an xdist worker, after every other plugin's collection hook: the groups in the node ids (see above), and
    the tests marked ``slow`` first (a stable sort), so that the run does not end on one of them while the other
    worker has nothing left. A run in one process keeps the files' order and its node ids."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if config.getvalue("loadgroup"):
            for item in items:
                _group_in_node_id(item)
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        config.pluginmanager.register(_Worker(), "miles-xdist-worker")


FIRST_GROUPS = ("slurm", "sglang")
"""The two longest groups (several minutes each), handed out first so that each starts at once on its own worker."""


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class LongGroupsFirst(LoadGroupScheduling):
        def _assign_work_unit(self, node: object) -> None:
            for scope in FIRST_GROUPS:
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
                    break
            super()._assign_work_unit(node)  # type: ignore[arg-type]

    return LongGroupsFirst(config, log)  # type: ignore[arg-type]
