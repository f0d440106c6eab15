"""Every public name of factscope's packages has a docstring.

The public names of a module are its ``__all__`` when it has one, else the functions and
classes it defines whose names do not start with an underscore; the public methods and
properties of a public class count too. A dataclass's generated ``Name(field, ...)`` text is
not a docstring. :func:`missing_docstrings` is called by the docs build (``docs/hooks/generate.py``,
so ``mkdocs build --strict`` fails) and by ``tests/test_docs_examples.py``.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Iterator
from types import ModuleType

PACKAGES = ("factscope", "tracing", "editing", "viz")


def public_modules(package: str) -> Iterator[ModuleType]:
    """The package and each of its modules and subpackages whose names are public."""
    root = importlib.import_module(package)
    yield root
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        yield importlib.import_module(info.name)


def _own_doc(obj: object) -> str | None:
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
        if doc and doc.startswith(f"{obj.__name__}("):  # a dataclass's generated signature
            return None
        return doc
    return getattr(obj, "__doc__", None)


def _public_names(module: ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and getattr(value, "__module__", None) == module.__name__
    ]


def _method_doc(cls: type, name: str, attr: object) -> str:
    """A method's docstring, or the one it overrides (a protocol's or a base class's)."""
    doc = (getattr(attr, "__doc__", None) or "").strip()
    for base in cls.__mro__[1:]:
        if doc:
            break
        doc = (getattr(base.__dict__.get(name), "__doc__", None) or "").strip()
    return doc


def _members(cls: type) -> Iterator[tuple[str, object]]:
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            yield name, value


def missing_docstrings(packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Dotted names of the public modules, functions, classes and methods without a
    docstring, sorted (an empty list when every one has its own)."""
    missing: set[str] = set()
    for package in packages:
        for module in public_modules(package):
            if not (module.__doc__ or "").strip():
                missing.add(module.__name__)
            if module.__name__ == "factscope":
                continue  # its names are the packages' own, checked where they are defined
            for name in _public_names(module):
                value = getattr(module, name)
                home = getattr(value, "__module__", module.__name__)
                if home != module.__name__:
                    continue  # re-exported: checked in the module that defines it
                if (inspect.isfunction(value) or inspect.isclass(value)) and not (
                    _own_doc(value) or ""
                ).strip():
                    missing.add(f"{module.__name__}.{name}")
                if inspect.isclass(value):
                    for member, attr in _members(value):
                        if not _method_doc(value, member, attr):
                            missing.add(f"{module.__name__}.{name}.{member}")
    return sorted(missing)


if __name__ == "__main__":
    for dotted in missing_docstrings():
        print(dotted)
