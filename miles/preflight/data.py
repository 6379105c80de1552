"""Pre-flight of the prompt and evaluation data: files exist, are readable, and their first rows fit the spec.

The rules are the dataset's own (:func:`miles.data.records.read_records` and
:func:`miles.data.dataset.check_record`), applied to the head of each file
without a tokenizer, so that what fails here is exactly what would fail when the
trainer loads the data, only before any process or job exists.
"""

from __future__ import annotations

from pathlib import Path

from miles.data.dataset import DataKeys, check_record, no_records
from miles.data.records import read_records
from miles.errors import UserError
from miles.preflight.paths import look
from miles.preflight.report import Report
from miles.spec.tables import Spec

HEAD_ROWS = 100
"""Records read from the start of each file; the rest is read (and checked the same way) when the run loads it."""


def check_data(spec: Spec, report: Report, local_only: bool) -> None:
    """Check ``[rollout] prompt_data`` and every ``[eval] eval_prompt_data`` file."""
    files: list[tuple[tuple[str, ...], str, str, DataKeys]] = []
    if spec.rollout.prompt_data:
        files.append(
            (
                ("rollout", "prompt_data"),
                "rollout.prompt_data",
                spec.rollout.prompt_data,
                DataKeys.for_rollout(spec.rollout),
            )
        )
    eval_keys = DataKeys.for_eval(spec.eval, spec.rollout)
    for name, path in spec.eval.eval_prompt_data.items():
        files.append((("eval", "eval_prompt_data", name), f"eval.eval_prompt_data.{name}", path, eval_keys))
    for key_path, spec_key, path, keys in files:
        seen = look(path, local_only)
        if seen.kind == "elsewhere":
            report.note(f"{spec_key}: {seen.why}")
            continue
        if seen.kind == "missing":
            report.problem(key_path, f"{path}: {seen.why}; set {spec_key} to an existing .jsonl or .parquet file")
            continue
        if Path(path).is_dir():
            report.problem(key_path, f"{path} is a directory; set {spec_key} to a .jsonl or .parquet file")
            continue
        try:
            records = read_records(path, spec_key, limit=HEAD_ROWS)
            if not records:
                raise no_records(path, spec_key)
            for record in records:
                check_record(record, keys)
        except UserError as e:
            report.problem(key_path, str(e))
