"""One entry point for every editing method: :func:`make_edit`.

``make_edit(model, requests, "rome" | "memit" | "ft-l" | ...)`` looks the method up in the
registry (:mod:`editing.methods`), resolves its hyper-parameters, prepares the requests once
(validation, context templates, tokenisation: :func:`editing.requests.prepared.prepare_requests`),
runs the method and returns an :class:`~editing.edits.edit.Edit`. The model is unchanged on return
(``edit.apply(model)`` is the caller's choice); on any failure the weights are exactly
restored.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from editing.edits.edit import Edit
from editing.edits.weights import restoring_weights
from editing.hparams import Hparams, KeyValueHparams
from editing.methods import EditInputs, get_method
from editing.requests import EditRequest
from editing.requests.context import context_template_groups
from editing.requests.prepared import prepare_requests
from editing.statistics.keys import Stats
from tracing.errors import InvalidHparams, InvalidInput
from tracing.models import HookedModel, check_layer, down_proj, model_name

log = logging.getLogger(__name__)

#: What :func:`resolve_hparams` accepts as ``hparams``.
HparamsLike = Hparams | Mapping[str, Any] | str | Path | None


def resolve_hparams(
    model: HookedModel,
    method: str,
    hparams: HparamsLike = None,
    layers: Sequence[int] | None = None,
) -> Hparams:
    """The hyper-parameters :func:`make_edit` uses: ``hparams`` as given (an object of the
    method's class, a dict of overrides or complete fields, or a JSON file), else the shipped
    defaults for the model; ``layers`` replaces the layer choice (ROME: exactly one layer).
    Layers are checked against the model."""
    spec = get_method(method)
    if hparams is None or isinstance(hparams, str | Path):
        path = None if hparams is None else Path(hparams)
        hp = spec.load_hparams(None if path else model_name(model), path)
    elif isinstance(hparams, Mapping):
        fields = {k: v for k, v in hparams.items() if not str(k).startswith("_")}
        hp = spec.load_hparams(model_name(model), **fields)
    elif isinstance(hparams, spec.hparams):
        hp = hparams.from_dict({**hparams.to_dict(), **spec.fixed})
    else:
        raise InvalidHparams(
            f"method {spec.name!r} needs {spec.hparams.__name__}, got {type(hparams).__name__}"
        )
    if layers is not None:
        layers = [int(L) for L in layers]
        if not layers:
            raise InvalidInput("an empty layer list was given")
        hp = hp.with_layers(sorted(check_layer(model, L) for L in layers))
    if not hp.layers:
        raise InvalidHparams(
            f"no layers chosen for {spec.name!r} on this model: pass layers (e.g. from "
            "select-layers) or an hparams file that sets them"
        )
    for L in hp.layers:
        check_layer(model, L)
    if spec.check is not None:
        spec.check(model, hp)
    return hp


def make_edit(
    model: HookedModel,
    requests: EditRequest | Sequence[EditRequest],
    method: str,
    hparams: HparamsLike = None,
    *,
    layers: Sequence[int] | None = None,
    stats: Stats | None = None,
    context_templates: Sequence[str] | Sequence[Sequence[str]] | None = None,
    progress: bool = True,
    shard_targets: bool = False,
    target_cache: str | Path | None = None,
    preserved_keys: Mapping[int, torch.Tensor] | None = None,
    exclude_subjects: Sequence[str] = (),
) -> Edit:
    """Compute an edit of ``requests`` with ``method`` and return it; the model is unchanged.

    ``rome`` with several requests edits them one after another (each computed on the model
    with the previous ones applied, as sequential ROME does) and returns one combined Edit;
    ``memit`` edits all requests at once; ``ft-l`` / ``ft`` / ``mixed`` fine-tune.
    ``hparams``: see :func:`resolve_hparams`; ``stats`` (ROME/MEMIT): precomputed E[k k^T] by
    layer; ``context_templates`` (ROME/MEMIT): your own templates (a list, or a list of
    groups) instead of the model-generated ones. ``shard_targets``: every torchrun rank is
    making this same edit, so MEMIT's per-request z optimisation is split across them (and
    gathered before the layer updates); the result is the one-process result.
    ``target_cache`` (MEMIT, AlphaEdit): a folder where each request's z is written once final,
    so an interrupted batch resumes. ``preserved_keys`` (AlphaEdit): by layer, ``K^T K`` of the
    keys of earlier edits in a sequence (``Edit.keys``), which the new update leaves
    mapped as they are. ``exclude_subjects`` (AlphaEdit with ``knowledge_share``): subjects,
    besides the batch's own, whose known facts stay out of the preserved set (a sequential
    stream passes all of its subjects). Bad input raises a
    :class:`~tracing.errors.FactscopeError` before any weight changes; any failure part-way
    restores the weights exactly.
    """
    spec = get_method(method)
    batch = [requests] if isinstance(requests, EditRequest) else list(requests)
    hp = resolve_hparams(model, spec.name, hparams, layers)
    templates: Sequence[str] | Sequence[Sequence[str]] = ("{}",)
    if spec.uses_templates:
        if context_templates is not None:
            templates = context_templates
        else:
            assert isinstance(hp, KeyValueHparams), "template methods use KeyValueHparams"
            templates = context_template_groups(model, hp.context_templates)
    prepared = prepare_requests(model, batch, templates)
    touched = hp.layers
    with restoring_weights(model, touched, always=True) as before:
        inputs = EditInputs(
            stats=stats,
            progress=progress,
            shard_targets=shard_targets,
            target_cache=None if target_cache is None else Path(target_cache),
            preserved_keys=preserved_keys,
            exclude_subjects=tuple(exclude_subjects),
        )
        edit = spec.edit(model, prepared, hp, inputs)
    for L, W in before.items():
        if not torch.equal(down_proj(model, L), W):  # pragma: no cover - a guard, not a path
            raise RuntimeError(f"layer {L} was not restored after editing")
    return edit
