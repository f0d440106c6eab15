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
