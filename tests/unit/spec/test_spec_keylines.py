"""Line numbers of TOML keys: the scanner never mistakes text inside values for keys."""

from __future__ import annotations

from miles.spec.keylines import KeyLines

LINES = [
    "# comment with key = 1",  # 1
    "top = 1",  # 2
    "",  # 3
    "[slurm]",  # 4
    "setup = [",  # 5
    '  "export A=1",',  # 6
    '  """',  # 7
    'time = "not a key"',  # 8
    '""",',  # 9
    "  'modules = x',  # comment = 2",  # 10
    "]",  # 11
    'time = "04:00:00"   # the real one',  # 12
    '"quoted key" = 3',  # 13
    'env = { NCCL_DEBUG = "INFO", B = "2" }',  # 14
    "modules = [",  # 15
    '  "a",',  # 16
    "]",  # 17
    "a.b.c = 1",  # 18
    "literal = '''",  # 19
    "exclusive = false",  # 20
    "still inside '''",  # 21
    'reservation = "r"',  # 22
    "",  # 23
    "[ rollout ]",  # 24
    "rollout_batch_size = 4 # trailing",  # 25
    'prompt_data = "a # not a comment = x"',  # 26
]
TEXT = "\n".join(LINES) + "\n"


def test_lines() -> None:
    lines = KeyLines(TEXT)
    expected = {
        ("top",): 2,
        ("slurm",): 4,
        ("slurm", "setup"): 5,
        ("slurm", "time"): 12,
        ("slurm", "quoted key"): 13,
        ("slurm", "env"): 14,
        ("slurm", "modules"): 15,
        ("slurm", "a", "b", "c"): 18,
        ("slurm", "a"): 18,
        ("slurm", "literal"): 19,
        ("slurm", "reservation"): 22,
        ("rollout",): 24,
        ("rollout", "rollout_batch_size"): 25,
        ("rollout", "prompt_data"): 26,
    }
    for path, line in expected.items():
        assert lines.line_of(path) == line, path
    assert lines.line_of(("slurm", "env", "NCCL_DEBUG")) == 14  # inline table entries: the table's line
    assert lines.line_of(("slurm", "exclusive")) == 4  # text inside a multi-line string: falls back to [slurm]
    assert lines.line_of(("nothing",)) is None


def test_dotted_tables_and_arrays_of_tables() -> None:
    text = '[run]\nname = "x"\n\n[[a.b]]\nk = 1\n\n["quoted.table"]\nk = 2\n'
    lines = KeyLines(text)
    assert lines.line_of(("run", "name")) == 2
    assert lines.line_of(("a", "b", "k")) == 5
    assert lines.line_of(("quoted.table", "k")) == 8
