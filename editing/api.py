"""One entry point for every editing method: :func:`make_edit`.

``make_edit(model, requests, "rome" | "memit" | "ft-l" | "ft" | "mixed")`` returns an
:class:`~editing.edit.Edit` and leaves the model unchanged (``edit.apply(model)`` is the
caller's choice); on any failure the weights are exactly restored. Hyper-parameters default to
the shipped files for the model (:func:`editing.hparams.load_hparams`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from editing.edit import Edit, model_name, restoring_weights
from editing.hparams import FTHparams, MemitHparams, RomeHparams, load_hparams
from editing.requests import EditRequest, validate_requests
from tracing.models import check_layer, down_proj

log = logging.getLogger(__name__)

METHODS = ("rome", "memit", "ft-l", "ft", "mixed")
_FT_MODES = {"ft-l": "constrained", "ft": "unconstrained", "mixed": "mixed"}
_CLASSES = {"rome": RomeHparams, "memit": MemitHparams}


def resolve_hparams(
    model,
    method: str,
    hparams: RomeHparams | MemitHparams | FTHparams | Mapping | str | Path | None = None,
    layers: Sequence[int] | None = None,
) -> RomeHparams | MemitHparams | FTHparams:
    """The hyper-parameters :func:`make_edit` uses: ``hparams`` as given (a dataclass, a dict
    of overrides or complete fields, or a JSON file), else the shipped defaults for the
    model; ``layers`` replaces the layer choice (ROME: exactly one layer). Layers are checked
    against the model."""
    method = _method(method)
    family = "ft" if method in _FT_MODES else method
    if hparams is None or isinstance(hparams, str | Path):
        path = None if hparams is None else Path(hparams)
        hp = load_hparams(method, None if path else model_name(model), path=path)
    elif isinstance(hparams, Mapping):
        fields = {k: v for k, v in hparams.items() if not str(k).startswith("_")}
        hp = load_hparams(method, model_name(model), **fields)
    else:
        expected = FTHparams if family == "ft" else _CLASSES[family]
        if not isinstance(hparams, expected):
            raise ValueError(
                f"method {method!r} needs {expected.__name__}, got {type(hparams).__name__}"
            )
        hp = dataclasses.replace(hparams)
        if family == "ft" and hp.mode != _FT_MODES[method]:
            hp = dataclasses.replace(hp, mode=_FT_MODES[method])
    if layers is not None:
        layers = [int(L) for L in layers]
        if not layers:
            raise ValueError("an empty layer list was given")
        for L in layers:
            check_layer(model, L)
        if isinstance(hp, RomeHparams):
            if len(layers) != 1:
                raise ValueError(f"ROME edits exactly one layer; got layers {layers}")
            hp = dataclasses.replace(hp, layer=layers[0])
        else:
            hp = dataclasses.replace(hp, layers=sorted(layers))
    chosen = hp.layers
    if not chosen:
        raise ValueError(
            f"no layers chosen for {method!r} on this model: pass layers (e.g. from "
            "select-layers) or an hparams file that sets them"
        )
    for L in chosen:
        check_layer(model, L)
    return hp


def _method(method: str) -> str:
    key = str(method).lower()
    if key not in METHODS:
        raise ValueError(f"unknown editing method {method!r}; expected one of {list(METHODS)}")
    return key


def make_edit(
    model,
    requests: Sequence[EditRequest],
    method: str,
    hparams: Any = None,
    *,
    layers: Sequence[int] | None = None,
    stats: Mapping | None = None,
    context_templates: Sequence[str] | None = None,
    progress: bool = True,
) -> Edit:
    """Compute an edit of ``requests`` with ``method`` and return it; the model is unchanged.

    ``rome`` with several requests edits them one after another (each computed on the model
    with the previous ones applied, as sequential ROME does) and returns one combined Edit.
    ``memit`` edits all requests at once. ``ft-l`` / ``ft`` / ``mixed`` call
    :func:`editing.finetune.finetune_edit`. ``hparams``: see :func:`resolve_hparams`;
    ``stats`` (ROME/MEMIT): precomputed E[k k^T] by layer; ``context_templates`` (ROME/MEMIT):
    your own templates instead of the model-generated ones. Every bad input raises a
    ValueError before any weight changes; any failure part-way restores the weights exactly.
    """
    method = _method(method)
    if isinstance(requests, EditRequest):
        requests = [requests]
    requests = list(requests)
    hp = resolve_hparams(model, method, hparams, layers)
    validate_requests(model, requests)
    touched = hp.layers
    before = {L: down_proj(model, L).detach().clone() for L in touched}
    with restoring_weights(model, touched, always=True):
        if method in _FT_MODES:
            from editing.finetune import finetune_edit

            edit = finetune_edit(model, requests, hp, progress=progress)  # type: ignore[arg-type]
        elif method == "memit":
            from editing.memit import memit_edit

            edit = memit_edit(
                model,
                requests,
                hp,  # type: ignore[arg-type]
                stats=stats,
                context_templates=context_templates,
                progress=progress,
            )
        else:
            edit = _sequential_rome(model, requests, hp, stats, context_templates, progress)  # type: ignore[arg-type]
    for L, W in before.items():
        if not torch.equal(down_proj(model, L), W):  # pragma: no cover - a guard, not a path
            raise RuntimeError(f"layer {L} was not restored after editing")
    return edit


def _sequential_rome(
    model,
    requests: list[EditRequest],
    hp: RomeHparams,
    stats: Mapping | None,
    templates: Sequence[str] | None,
    progress: bool,
) -> Edit:
    from editing.rome import _templates, load_layer_stats, rome_edit

    if stats is None:
        stats = load_layer_stats(model, [hp.layer], hp, progress=progress)  # type: ignore[list-item]
    templates = _templates(model, hp, templates)
    edits = []
    for i, req in enumerate(requests):
        if len(requests) > 1:
            log.info("ROME request %d/%d: %s", i + 1, len(requests), req.describe(i))
        edit = rome_edit(
            model, req, hp, stats=stats, context_templates=templates, progress=progress
        )
        edits.append(edit)
        if i + 1 < len(requests):  # later requests see the earlier edits
            with torch.no_grad():
                for d in edit.deltas:
                    down_proj(model, d.layer).add_(d.matrix(down_proj(model, d.layer).dtype))
    return edits[0] if len(edits) == 1 else Edit.combine(edits, "rome")
