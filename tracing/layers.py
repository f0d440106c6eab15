"""The one grammar for naming layers, on the command line and in the API.

:func:`parse_layers` reads ``"4"``, ``"3-8"`` (inclusive), ``"3,5,7"``, mixes such as
``"2-4,7"``, a list of ints, or the path of a JSON file holding a list or a ``{"layers": [...]}``
object (what ``factscope select-layers`` writes). Checking the layers against a model is
:func:`tracing.models.check_layer`'s job.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tracing.errors import InvalidInput


def _from_json(path: Path) -> list[int]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"cannot read layers from {path}: {exc}") from exc
    data = data.get("layers") if isinstance(data, dict) else data
    if not isinstance(data, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in data
    ):
        raise InvalidInput(f"{path}: expected a list of layers or {{'layers': [...]}}")
    return _checked(data, str(path))


def _checked(layers: Sequence[int], spec: str) -> list[int]:
    if not layers:
        raise InvalidInput(f"empty layer list {spec!r}: give e.g. 3-8, 3,5,7 or 4")
    if any(x < 0 for x in layers):
        raise InvalidInput(f"negative layer in {spec!r}")
    return sorted(set(layers))


def parse_layers(spec: str | Path | Sequence[int]) -> list[int]:
    """Layers from ``"4"``, ``"3-8"``, ``"3,5,7"``, ``"2-4,7"``, a list of ints, or a JSON
    file (a list, or ``{"layers": [...]}`` as ``select-layers`` writes); sorted, without
    repeats. Raises :class:`~tracing.errors.InvalidInput` saying what is wrong."""
    if isinstance(spec, Path) or (isinstance(spec, str) and spec.strip().endswith(".json")):
        path = Path(spec)
        if not path.is_file():
            raise InvalidInput(f"no layer file {path}")
        return _from_json(path)
    if not isinstance(spec, str):
        values = list(spec)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in values):
            raise InvalidInput(f"layers must be integers, got {values!r}")
        return _checked(values, str(values))
    text = spec.replace(" ", "")
    if not text:
        raise InvalidInput("empty layer list: give e.g. 3-8, 3,5,7 or 4")
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise InvalidInput(
                f"bad layer spec {part!r} in {spec!r}: expected N, N-M, a comma list or a "
                "select-layers JSON file"
            ) from None
        if b < a:
            raise InvalidInput(f"bad layer range {part!r} in {spec!r}")
        out.extend(range(a, b + 1))
    return _checked(out, spec)
