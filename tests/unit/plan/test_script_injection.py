"""Property tests: no spec value can inject shell into the rendered script.

Values are built from shell metacharacters and payloads that would create a
marker file if anything evaluated them (``$(...)``, backticks, quote breaks,
newlines). Each rendered script must pass ``bash -n``; the running tests execute
it with the fake Slurm commands of :mod:`script_harness` and check that the
marker never appears and that the value reaches the ranks byte for byte. Values
bound for ``#SBATCH`` lines may instead be refused with a PlanError naming the
field: that is the designed outcome for them.
"""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from miles.plan import PlanError, make_plan, render_script
from miles.spec.tables import Spec
from tests.unit.plan.plan_specs import spec
from tests.unit.plan.script_harness import run_script

WORK = Path(tempfile.mkdtemp(prefix="miles-inject-"))
atexit.register(shutil.rmtree, WORK, True)  # also when the module is only collected
MARK = WORK / "pwned"

_PAYLOADS = [
    f"$(touch {MARK})",
    f"`touch {MARK}`",
    f"'; touch {MARK}; '",
    f'"; touch {MARK}; "',
    f"\ntouch {MARK}\n",
    f"$(IFS=_;touch${{IFS}}{MARK})",
    f"\\'$(touch {MARK})",
    f"' \"$(touch {MARK})\" '",
    f"${{X:-$(touch {MARK})}}",
    f"\r\n#SBATCH --wrap=touch {MARK}\n",
]
_PIECES = st.sampled_from(_PAYLOADS) | st.text(alphabet=" \t\n'\"\\$`;|&()<>{}*?![]#~%=:,.-_/aZ0é", max_size=6)
VALUES = st.lists(_PIECES, min_size=1, max_size=4).map("".join)
_RUN = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
_PARSE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _cleanup() -> Iterator[None]:
    yield
    shutil.rmtree(WORK, ignore_errors=True)


def _with(s: Spec, **tables: dict[str, Any]) -> Spec:
    for table, changes in tables.items():
        s = dataclasses.replace(s, **{table: dataclasses.replace(getattr(s, table), **changes)})
    return s


def _base(mode: str = "split", **slurm: Any) -> Spec:
    return _with(spec(mode), run={"run_dir": str(WORK / "run")}, slurm=slurm)


def _render(s: Spec) -> str | None:
    """The script, or None when the planner refused the value (with a message naming a field)."""
    try:
        return render_script(s, make_plan(s))
    except PlanError as e:
        assert "Fix:" in str(e)
        return None


def _bash_n(text: str) -> None:
    done = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert done.returncode == 0, done.stderr


def _run(text: str, mode: str = "done") -> dict[str, dict[str, str]]:
    MARK.unlink(missing_ok=True)
    sandbox = Path(tempfile.mkdtemp(dir=WORK))
    out = run_script(text, sandbox, trainer=mode)
    assert not MARK.exists(), "an injected command ran"
    assert out.rc == 0, out.stderr
    return out.env | {"args": {str(i): a for i, a in enumerate(out.args["trainer"])}}


@_RUN
@given(value=VALUES)
def test_env_values_arrive_verbatim(value: str) -> None:
    text = _render(_base(env={"MY_VAR": value}))
    assert text is not None
    _bash_n(text)
    env = _run(text)
    assert env["trainer"]["MY_VAR"] == value and env["engine"]["MY_VAR"] == value


@_RUN
@given(value=VALUES)
def test_interpreter_path_arrives_verbatim(value: str) -> None:
    text = _render(_base(python=value))
    if text is None:
        assert "\n" in value or not value
        return
    _bash_n(text)
    args = _run(text)["args"]
    assert value in args.values()


@_RUN
@given(image=VALUES, mount=VALUES)
def test_pyxis_image_and_mounts(image: str, mount: str) -> None:
    text = _render(_base(container_runtime="pyxis", container_image=image, container_mounts=[mount]))
    if text is None:  # a mount with a comma or a newline is refused
        assert "," in mount or "\n" in mount or "\n" in image or not mount.strip() or not image.strip()
        return
    _bash_n(text)
    args = list(_run(text)["args"].values())
    assert f"--container-image={image}" in args
    assert any(a.startswith("--container-mounts=") and a.endswith("," + mount) for a in args)


@_RUN
@given(image=VALUES, mount=VALUES)
def test_apptainer_image_and_mounts(image: str, mount: str) -> None:
    text = _render(_base("colocate", container_runtime="apptainer", container_image=image, container_mounts=[mount]))
    if text is None:
        return
    _bash_n(text)
    args = list(_run(text)["args"].values())
    assert image in args and mount in args


@_RUN
@given(module=VALUES)
def test_module_names(module: str) -> None:
    text = _render(_base(modules=[module]))
    if text is None:
        assert "\n" in module
        return
    _bash_n(text)
    _run(text)


@_PARSE
@given(
    value=VALUES,
    field=st.sampled_from(
        [
            ("run", "name"),
            ("run", "run_dir"),
            ("slurm", "partition"),
            ("slurm", "account"),
            ("slurm", "qos"),
            ("slurm", "constraint"),
            ("slurm", "reservation"),
            ("slurm", "rollout_partition"),
            ("slurm", "time"),
            ("cluster", "mem_per_node"),
        ]
    ),
)
def test_directive_values_are_refused_or_inert(value: str, field: tuple[str, str]) -> None:
    table, key = field
    s = _with(_base(), **{table: {key: value}})
    text = _render(s)
    if text is None:
        return
    _bash_n(text)
    # accepted values hold no character that sbatch or bash would treat specially; a constraint may use
    # Slurm's own operators (a|b, a&b, [a*2], !a), which only ever appear inside an #SBATCH comment line
    special = set(" \t\n\r'\"\\$`;|<>{}?#%") - (set("|") if key == "constraint" else set())
    assert not set(value) & special
    if key == "constraint":
        assert all(line.startswith("#SBATCH") for line in text.splitlines() if value in line and "constraint" in line)


@_PARSE
@given(value=VALUES)
def test_setup_lines_with_newlines_are_refused(value: str) -> None:
    s = _base(setup=[f"echo start{value}"])
    if "\n" in value or "\r" in value:
        with pytest.raises(PlanError, match=r"slurm.setup\[0\]"):
            make_plan(s)
    else:
        # a single admin line: emitted verbatim, exactly once, on its own line
        text = render_script(s, make_plan(s))
        assert f"\necho start{value}\n" in text


def test_setup_lines_are_executed_verbatim() -> None:
    """By design: slurm.setup is the site's shell preamble and runs as written."""
    marker = WORK / "setup-ran"
    text = _render(_base(setup=[f"touch {marker}"]))
    assert text is not None
    sandbox = Path(tempfile.mkdtemp(dir=WORK))
    assert run_script(text, sandbox).rc == 0 and marker.exists()


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        ("run", "name", "0\n"),
        ("run", "run_dir", "0\n"),
        ("slurm", "partition", "gpu\n"),
        ("slurm", "constraint", "h100\n"),
        ("cluster", "mem_per_node", "64G\n"),
    ],
)
def test_a_trailing_newline_is_refused(table: str, key: str, value: str) -> None:
    """A Python pattern's ``$`` also matches before a final newline; the planner's checks end at the string's end."""
    assert _render(_with(_base(), **{table: {key: value}})) is None
