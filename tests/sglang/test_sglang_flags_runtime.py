"""The flag list read statically from the wheel equals the parser of the installed SGLang.

``miles/spec/sglang_flags.json`` is generated with ``ast`` from the wheel (no
import). This test builds SGLang's real argparse parser (``ServerArgs.add_cli_args``)
in ``.venv-sglang`` and checks that both agree on every flag: name, aliases,
type, default and choices. Choices SGLang computes at run time from plugin
registries (parsers, sampling backends) are absent from the static list and
are left to SGLang itself to check.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from miles.sglang.flags import load_flags
from tests.sglang.sglang_servers import SGLANG_PYTHON, SHIMS, SKIP_REASON, sglang_available

pytestmark = [pytest.mark.sglang, pytest.mark.skipif(not sglang_available(), reason=SKIP_REASON)]

DUMP = r"""
import argparse, json, sys
from sglang.srt.server_args import ServerArgs
parser = argparse.ArgumentParser()
ServerArgs.add_cli_args(parser)
out = {}
for a in parser._actions:
    longs = [o for o in a.option_strings if o.startswith("--")]
    if not longs or a.dest == "help":
        continue
    default = a.default if isinstance(a.default, (str, int, float, bool, list, type(None))) else repr(a.default)
    out[longs[0][2:].replace("-", "_")] = {
        "aliases": [o[2:].replace("-", "_") for o in longs[1:]],
        "action": type(a).__name__,
        "nargs": a.nargs if isinstance(a.nargs, (str, int, type(None))) else str(a.nargs),
        "choices": sorted(map(str, a.choices)) if a.choices is not None else None,
        "type": getattr(a.type, "__name__", None) if a.type else None,
        "default": default,
    }
json.dump(out, sys.stdout)
"""

BOOL_ACTIONS = {"_StoreTrueAction", "BooleanOptionalAction", "DeprecatedStoreTrueAction"}


def test_static_flags_equal_sglangs_own_parser() -> None:
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": str(SHIMS)}
    proc = subprocess.run([str(SGLANG_PYTHON), "-c", DUMP], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runtime = json.loads(proc.stdout)
    static = load_flags()
    assert set(static) == set(runtime)
    for key, entry in static.items():
        real = runtime[key]
        aliases = [a for a in real["aliases"] if a != f"no_{key}"]
        assert sorted(entry.get("aliases", [])) == sorted(aliases), key
        assert bool(entry.get("negatable")) == (f"no_{key}" in real["aliases"]), key
        assert entry["default"] == real["default"], key
        if "choices" in entry:
            assert sorted(map(str, entry["choices"])) == real["choices"], key
        kind = entry["type"]
        if kind == "bool":
            assert real["action"] in BOOL_ACTIONS, (key, real)
        elif kind == "list":
            assert real["nargs"] in ("+", "*"), (key, real)
        elif kind in ("int", "float"):
            assert real["type"] in (kind, "human_readable_int"), (key, real)
        else:
            assert real["action"] not in BOOL_ACTIONS and real["nargs"] not in ("+", "*"), (key, real)
