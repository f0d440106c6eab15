"""The old flat module names of ``editing`` (before its subpackages): each warns once and
gives the module at its new name, the very same object."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

import editing
from editing import _moved


def _fresh_import(name: str) -> tuple[object, list[warnings.WarningMessage]]:
    """Import ``name`` as a first import would (dropped from ``sys.modules`` and its parent)."""
    sys.modules.pop(name, None)
    parent, _, leaf = name.rpartition(".")
    if hasattr(sys.modules[parent], leaf):
        delattr(sys.modules[parent], leaf)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(name)
    return module, [w for w in caught if issubclass(w.category, DeprecationWarning)]


def test_import_editing_objective_warns_and_is_editing_targets_objective():
    import editing.targets.objective as new

    old, caught = _fresh_import("editing.objective")
    assert old is new
    assert len(caught) == 1
    assert str(caught[0].message) == (
        "editing.objective moved to editing.targets.objective; import it from there"
    )
    assert new.__name__ == "editing.targets.objective"
    assert new.__spec__ is not None and new.__spec__.name == "editing.targets.objective"


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_every_old_name_is_its_new_module(old):
    new = importlib.import_module(_moved.MOVED[old])
    module, caught = _fresh_import(old)
    assert module is new
    assert [str(w.message) for w in caught] == [
        f"{old} moved to {_moved.MOVED[old]}; import it from there"
    ]
    # patching the old name patches the module the new name's users read
    marker = object()
    setattr(sys.modules[old], "_patched_by_a_test", marker)  # noqa: B010
    assert vars(new).pop("_patched_by_a_test") is marker


def test_the_finder_alone_serves_an_old_name_without_a_file(monkeypatch):
    """The finder ``editing/__init__.py`` installs, on a name that has no file at all (as every
    old name once their files are gone)."""
    assert any(isinstance(f, _moved.MovedFinder) for f in sys.meta_path)
    monkeypatch.setitem(_moved.MOVED, "editing.old_name_for_a_test", "editing.edits.format")
    monkeypatch.delitem(sys.modules, "editing.old_name_for_a_test", raising=False)
    with pytest.warns(DeprecationWarning, match="editing.edits.format; import it from there"):
        import editing.old_name_for_a_test as old  # type: ignore[import-not-found]
    import editing.edits.format as new

    assert old is new
    assert new.__spec__ is not None and new.__spec__.name == "editing.edits.format"
    assert editing.old_name_for_a_test is new  # type: ignore[attr-defined]
    monkeypatch.delattr(editing, "old_name_for_a_test")
    assert _moved.MovedFinder().find_spec("editing.not_a_module") is None


def test_install_adds_one_finder():
    _moved.install()
    _moved.install()
    assert sum(isinstance(f, _moved.MovedFinder) for f in sys.meta_path) == 1


def test_old_names_of_the_targets_module_come_from_optimise():
    import editing.targets
    from editing.targets import optimise

    editing.targets.__dict__.pop("check_edit_layer", None)
    with pytest.warns(DeprecationWarning, match="editing.targets.optimise"):
        from editing.targets import check_edit_layer
    assert check_edit_layer is optimise.check_edit_layer
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        editing.targets.not_a_name  # noqa: B018
