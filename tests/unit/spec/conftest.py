"""Fixtures of the spec tests; the helpers live in specfiles.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.spec.specfiles import SpecFiles


@pytest.fixture
def specs(tmp_path: Path) -> SpecFiles:
    return SpecFiles(tmp_path)
