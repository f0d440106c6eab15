"""What ``pip install .`` (not editable) ships: every Python package folder is listed in
``pyproject.toml``, and so is every data folder the code reads at run time."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("factscope", "tracing", "editing", "viz")


def _listed() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(config["tool"]["setuptools"]["packages"])


def test_every_package_folder_is_listed():
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in TOP_LEVEL
        for init in (ROOT / top).rglob("__init__.py")
    }
    missing = sorted(on_disk - _listed())
    assert not missing, f"packages missing from pyproject.toml: {missing}"


def test_every_data_folder_is_listed():
    data = {"tracing.data", "editing.data", "editing.hparams_defaults"}
    for name in data:
        assert (ROOT / name.replace(".", "/")).is_dir(), name
    assert data <= _listed()


def _pyproject_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_version_comes_from_the_installed_metadata():
    import factscope as fs

    assert fs.__version__ == _pyproject_version()


def test_cli_version_prints_the_package_version(capsys):
    import pytest

    from factscope.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"factscope {_pyproject_version()}"


def test_changelog_has_a_section_for_the_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{_pyproject_version()}]" in text or f"## {_pyproject_version()}" in text
