"""An :class:`~editing.edits.edit.Edit` on disk: ``deltas.safetensors`` plus ``edit.json``.

``edit.json`` holds the format name and version, the method, the model's name and
fingerprint, the requests, the hyper-parameters, the metadata, and the delta layout: one
entry per :class:`~editing.edits.layer_delta.LayerDelta` in order (``layer``, ``kind`` ``dense`` or
``low_rank``, ``rank``, ``shape``, and ``param`` for a tensor other than the down-projection).
``deltas.safetensors`` holds the tensors of delta ``i`` as ``{i}.dense`` or ``{i}.left`` and
``{i}.right``, and the keys an update was solved for as ``keys.{layer}``.

Format version 2 is written; version 1 (down-projection deltas only, no ``param``) still
reads. Both files are written atomically (:mod:`tracing.io`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file

from editing.edits.layer_delta import LayerDelta
from editing.requests import EditRequest
from tracing.errors import InvalidInput
from tracing.io import atomic_path, write_json_atomic


@runtime_checkable
class SavedEdit(Protocol):
    """What :func:`write_edit` reads of an edit: the fields of
    :class:`~editing.edits.edit.Edit` (which this module does not import: ``edit`` depends on
    ``format``, not the other way)."""

    deltas: list[LayerDelta]
    method: str
    requests: list[EditRequest]
    hparams: dict
    model_fingerprint: str
    model_name: str
    metadata: dict
    keys: dict[int, torch.Tensor]


FORMAT = "factscope-edit"
VERSION = 2
#: Format versions :func:`read_edit` reads (1: down-projection deltas only, no ``param``).
READABLE_VERSIONS = (1, 2)


def jsonable(value: Any, what: str) -> Any:
    """``value`` (None, a mapping, or anything with ``to_dict``) as plain JSON data, as
    ``edit.json`` stores it (tensors and arrays become lists, paths strings); anything else
    is refused with an :class:`~tracing.errors.InvalidInput` naming ``what``."""
    if value is None:
        return {}
    if hasattr(value, "to_dict"):
        value = value.to_dict()

    def default(o: Any) -> Any:
        if hasattr(o, "tolist"):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")

    try:
        return json.loads(json.dumps(value, default=default))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"edit {what} must be JSON-serialisable: {exc}") from exc


def write_edit(edit: SavedEdit, folder: str | Path) -> Path:
    """Write ``deltas.safetensors`` and ``edit.json`` of ``edit`` into ``folder`` (made if
    missing); returns the folder."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    layout = []
    for i, d in enumerate(edit.deltas):
        if d.dense is not None:
            tensors[f"{i}.dense"] = d.dense.contiguous()
        else:
            tensors[f"{i}.left"] = d.left.contiguous()  # type: ignore[union-attr]
            tensors[f"{i}.right"] = d.right.contiguous()  # type: ignore[union-attr]
        kind = "dense" if d.dense is not None else "low_rank"
        entry = {"layer": d.layer, "kind": kind, "rank": d.rank, "shape": list(d.shape)}
        layout.append(entry if d.param is None else {**entry, "param": d.param})
    tensors.update({f"keys.{L}": k.contiguous() for L, k in edit.keys.items()})
    with atomic_path(out / "deltas.safetensors") as tmp:
        save_file(tensors, str(tmp))
    info = {
        "format": FORMAT,
        "version": VERSION,
        "method": edit.method,
        "model_name": edit.model_name,
        "model_fingerprint": edit.model_fingerprint,
        "deltas": layout,
        "requests": [r.to_dict() for r in edit.requests],
        "hparams": edit.hparams,
        "metadata": edit.metadata,
    }
    write_json_atomic(out / "edit.json", info)
    return out


def read_edit(folder: str | Path) -> dict[str, Any]:
    """The fields of the :class:`~editing.edits.edit.Edit` saved in ``folder`` (its constructor's
    keyword arguments). Files of format version 1 read unchanged; a missing file, another
    format or a newer version is refused with a one-line
    :class:`~tracing.errors.InvalidInput`."""
    src = Path(folder)
    meta_path, data_path = src / "edit.json", src / "deltas.safetensors"
    for p in (meta_path, data_path):
        if not p.is_file():
            raise InvalidInput(f"{src} is not a saved edit: {p.name} is missing")
    try:
        info = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{meta_path}: not readable ({exc})") from exc
    if info.get("format") != FORMAT or info.get("version") not in READABLE_VERSIONS:
        raise InvalidInput(
            f"{meta_path}: not a factscope edit of a readable version {READABLE_VERSIONS} "
            f"(found format {info.get('format')!r}, version {info.get('version')!r})"
        )
    tensors = load_file(str(data_path))
    deltas = []
    for i, entry in enumerate(info["deltas"]):
        try:
            if entry["kind"] == "dense":
                dense = tensors[f"{i}.dense"]
                deltas.append(LayerDelta(entry["layer"], dense=dense, param=entry.get("param")))
            else:
                deltas.append(
                    LayerDelta(
                        entry["layer"], left=tensors[f"{i}.left"], right=tensors[f"{i}.right"]
                    )
                )
        except KeyError as exc:
            raise InvalidInput(f"{data_path}: delta {i} is missing tensor {exc}") from exc
    return {
        "deltas": deltas,
        "method": info["method"],
        "requests": [EditRequest.from_dict(r) for r in info["requests"]],
        "hparams": info["hparams"],
        "model_fingerprint": info["model_fingerprint"],
        "model_name": info["model_name"],
        "metadata": info.get("metadata", {}),
        "keys": {int(k[5:]): v for k, v in tensors.items() if k.startswith("keys.")},
    }
