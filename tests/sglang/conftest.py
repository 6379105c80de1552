"""Fixtures of the engine-server tests: the tiny model, the engine kind, and one healthy server per kind.

SGLang variants are skipped, with a reason saying how to build ``.venv-sglang``,
when that environment is absent; the embedded variants always run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from miles.sglang import launcher as sl
from tests.sglang.sglang_servers import KINDS, SKIP_REASON, START_DEADLINE_S, launch, sglang_available


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if sglang_available():
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("kind") == "sglang":
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart's tiny Qwen2 (character tokenizer, random weights) as an HF directory."""
    from miles.model.builtin import materialize

    return materialize("tiny-arith", tmp_path_factory.mktemp("sglang-model") / "tiny", seed=0)


@pytest.fixture(scope="module", params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def served(kind: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[sl.EngineProcess]:
    """One engine of ``kind``, started through the launcher and healthy; stopped after the module."""
    log_dir = tmp_path_factory.mktemp(f"{kind}-logs")
    eng = launch(kind, 0, model_dir, log_dir, api_key="test-key-0")
    eng.start()
    try:
        eng.wait_healthy(START_DEADLINE_S)
        yield eng
    finally:
        eng.stop()
