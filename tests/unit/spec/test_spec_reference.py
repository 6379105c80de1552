"""docs/spec.md is generated from the tables; this fails when it is stale and says how to regenerate it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from miles.spec import reference
from miles.spec.tables import TABLES

DOC = Path(__file__).parents[3] / "docs" / "spec.md"


def test_docs_spec_md_is_current() -> None:
    assert DOC.read_text() == reference.render(), f"docs/spec.md is stale; regenerate it with: {reference.REGENERATE}"


def test_every_field_is_documented() -> None:
    docs = reference.attribute_docs()
    text = reference.render()
    for name, cls in TABLES.items():
        class_doc, field_docs = docs[cls.__name__]
        assert class_doc.startswith(f"[{name}]")
        assert f"## [{name}]" in text
        for f in dataclasses.fields(cls):
            assert field_docs.get(f.name), f"[{name}] {f.name} has no attribute docstring in its table module"
            if f.name != "server_args":
                assert f"| `{f.name}` |" in text


def test_reference_shows_types_defaults_and_ranges() -> None:
    text = reference.render()
    assert "| `rollout_top_p` | number, > 0.0 and <= 1.0 | `1.0` |" in text
    assert '| `engine` | one of `"sglang"`, `"embedded"` | `"embedded"` |' in text
    assert "| `rollout_batch_size` | integer, > 0 | unset |" in text
    assert "rollout_batch_size x n_samples_per_prompt = global_batch_size x num_steps_per_rollout" in text
    assert "`--key-with-dashes value`" in text
