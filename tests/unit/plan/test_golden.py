"""The committed scripts and plans of every example spec match what miles renders now."""

from __future__ import annotations

import pytest

from miles.plan import golden


def test_every_example_config_has_golden_files() -> None:
    stems = {p.stem for p in golden.config_paths()}
    assert {"colocate-1node-qwen2.5-1.5b", "split-2node-qwen3-8b", "split-16node-qwen3-moe"} <= stems
    for stem in stems:
        assert (golden.GOLDEN / f"{stem}.sbatch").exists(), f"accept with: {golden.ACCEPT}"


@pytest.mark.parametrize("config", golden.config_paths(), ids=lambda p: p.stem)
def test_rendering_matches_golden(config) -> None:  # type: ignore[no-untyped-def]
    for name, text in golden.render(config).items():
        path = golden.GOLDEN / name
        committed = path.read_text() if path.exists() else ""
        if committed != text:
            pytest.fail(
                f"{name} differs from the committed golden file:\n{golden.diff(name, committed, text)}\n"
                f"If the change is intended, accept it with: {golden.ACCEPT}"
            )


def test_golden_scripts_parse() -> None:
    import subprocess

    for path in sorted(golden.GOLDEN.glob("*.sbatch")):
        subprocess.run(["bash", "-n", str(path)], check=True)


def test_top_level_templates_link_for_admins() -> None:
    link = golden.ROOT / "templates"
    assert link.is_symlink() and link.resolve() == (golden.ROOT / "miles" / "templates").resolve()
    assert (link / "split.sbatch.j2").is_file() and (link / "colocate.sbatch.j2").is_file()
