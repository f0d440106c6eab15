"""Old module names of ``editing`` that moved into its subpackages.

``editing`` groups its modules by what they are about (:mod:`editing.requests`,
:mod:`editing.edits`, :mod:`editing.statistics`, :mod:`editing.targets`). Code written
against the flat layout keeps working: importing an old name (``import editing.objective``)
warns once with a ``DeprecationWarning`` naming the new one and gives the module at its new
name, the same object (so patching an attribute of either patches both). :data:`MOVED` maps
old names to new ones; :func:`install` adds the finder that serves them (done on import:
``editing/__init__.py`` imports this module first).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

#: Old module name -> the module that holds its code now.
MOVED: dict[str, str] = {
    "editing.corpus": "editing.statistics.corpus",
    "editing.fisher": "editing.statistics.fisher",
    "editing.keys": "editing.statistics.keys",
    "editing.nullspace": "editing.statistics.nullspace",
    "editing.stats": "editing.statistics.stats",
    "editing.objective": "editing.targets.objective",
    "editing.target_cache": "editing.targets.cache",
    "editing.target_loss": "editing.targets.target_loss",
    "editing.vocab_loss": "editing.targets.vocab_loss",
    "editing.edit": "editing.edits.edit",
    "editing.edit_format": "editing.edits.format",
    "editing.export": "editing.edits.export",
    "editing.layer_delta": "editing.edits.layer_delta",
    "editing.weights": "editing.edits.weights",
    "editing.context": "editing.requests.context",
    "editing.prepared": "editing.requests.prepared",
}
# ``editing.targets`` (now :mod:`editing.targets.optimise`) became the package itself: its old
# names are served, with the same warning, by ``editing/targets/__init__.py``. So did
# ``editing.requests`` (now :mod:`editing.requests.request`), whose names the package holds.


class _Alias(Loader):
    """Loads an old name as the already-importable module at its new name."""

    def __init__(self, new: str) -> None:
        self.new = new
        self._spec: ModuleSpec | None = None

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        """Warn, then return the module at the new name (imported if need be)."""
        warnings.warn(
            f"{spec.name} moved to {self.new}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(self.new)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module ran under its new name. Put back its own spec, which
        the import system has just replaced by the old name's."""
        module.__spec__ = self._spec


class MovedFinder(MetaPathFinder):
    """Finds the old names of :data:`MOVED` (after every other finder: a file at an old name,
    while one still exists, wins)."""

    def find_spec(
        self,
        fullname: str,
        path: Any = None,  # any path object: the import system hands over namespace paths
        target: Any = None,
    ) -> ModuleSpec | None:
        """A spec for an old name, None for any other."""
        new = MOVED.get(fullname)
        return None if new is None else ModuleSpec(fullname, _Alias(new))


def install() -> None:
    """Add :class:`MovedFinder` to ``sys.meta_path`` once."""
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedFinder())


install()
