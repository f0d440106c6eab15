"""An edit as a value: per-layer weight deltas plus what made them.

:class:`Edit` holds :class:`LayerDelta` objects, each the change of one tensor of one block:

* the MLP down-projection (``param`` None): low-rank factors where the method gives them
  (ROME, MEMIT), dense otherwise, in the architecture-neutral ``[d_mlp, d_model]`` orientation
  of :func:`tracing.models.down_proj`;
* any other tensor of a block (``param`` a name from :mod:`editing.params`, e.g.
  ``blocks.3.self_attn.q_proj.weight``): dense, in that tensor's own shape (fine-tuning of
  whole blocks, Zhu et al. 2020).

With the deltas it keeps the model fingerprint, requests, hyper-parameters and method.
``apply`` / ``undo`` restore the original weights bit for bit, ``save`` / ``load`` use
safetensors + JSON (:mod:`editing.edits.format`: format version 2; version-1 files, which hold
down-projection deltas only, still load), and an edit is refused by a model with another
fingerprint. :class:`LayerDelta` lives in :mod:`editing.edits.layer_delta`.
:func:`editing.edits.weights.restoring_weights` and :func:`editing.params.snapshot_targets` protect
weights around code that changes them in place.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from editing.edits.format import FORMAT, READABLE_VERSIONS, VERSION, jsonable, read_edit, write_edit
from editing.edits.layer_delta import LayerDelta
from editing.edits.weights import add_to_weight
from editing.params import (
    TargetKey,
    parse_name,
    restore_targets,
    snapshot_targets,
    target_tensor,
)
from editing.requests import EditRequest
from tracing.errors import EditFailed, InvalidInput
from tracing.models import HookedModel, fingerprint, model_name

__all__ = ["FORMAT", "READABLE_VERSIONS", "VERSION", "Edit", "LayerDelta"]

_STACK_ATTR = "_factscope_applied_edits"  # edits applied to a model, oldest first


@dataclass(eq=False, repr=False)
class Edit:
    """Weight deltas of one or more requests, with what made them. See the module docstring.

    ``apply(model)`` checks the fingerprint, saves the touched layers' weights and adds the
    deltas (all or nothing); ``undo(model)`` copies the saved weights back (bit-exact). Edits
    applied one after another to the same layers must be undone in reverse order.
    """

    deltas: list[LayerDelta]
    method: str
    requests: list[EditRequest]
    hparams: dict
    model_fingerprint: str
    model_name: str
    metadata: dict = field(default_factory=dict)
    # By layer, the keys ([n, d_mlp]) its update was solved for (MEMIT, AlphaEdit): what a
    # later null-space-constrained batch must keep mapping as they now do.
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    _originals: dict[TargetKey, torch.Tensor] | None = field(default=None, init=False)
    _model: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.deltas = list(self.deltas)
        if not self.deltas:
            raise InvalidInput("an Edit needs at least one LayerDelta")
        if not all(isinstance(d, LayerDelta) for d in self.deltas):
            raise InvalidInput("Edit.deltas must be LayerDelta objects")
        self.requests = list(self.requests)
        self.hparams = jsonable(self.hparams, "hparams")
        self.metadata = jsonable(self.metadata, "metadata")

    def __repr__(self) -> str:
        state = "applied" if self.is_applied else "not applied"
        return (
            f"Edit(method={self.method!r}, layers={self.layers}, requests={len(self.requests)}, "
            f"model={self.model_name!r}, {state})"
        )

    @property
    def layers(self) -> list[int]:
        """The layers this edit changes, sorted."""
        return sorted({d.layer for d in self.deltas})

    @property
    def parameters(self) -> list[str]:
        """What this edit changes, by name: ``blocks.{L}.down_proj`` for a down-projection
        delta (whatever its architecture calls it), the parameter name otherwise."""
        names = [f"blocks.{d.layer}.down_proj" if d.param is None else d.param for d in self.deltas]
        return list(dict.fromkeys(names))

    @property
    def is_applied(self) -> bool:
        """Whether this edit is currently applied to a model."""
        return self._originals is not None

    # ------------------------------------------------------------------ apply / undo

    def _planned(self, model: HookedModel) -> list[tuple[TargetKey, torch.Tensor]]:
        found = fingerprint(model)
        if found != self.model_fingerprint:
            name = model_name(model)
            raise InvalidInput(
                f"this edit was made for model {self.model_name!r} (fingerprint "
                f"{self.model_fingerprint}); {name} has fingerprint {found}: refusing to apply "
                "it to another model (weights unchanged)"
            )
        planned = []
        for i, d in enumerate(self.deltas):
            what = "the down-projection" if d.param is None else d.param
            try:
                W = target_tensor(model, d.key)
            except InvalidInput as exc:
                raise InvalidInput(f"delta {i}: {exc} (weights unchanged)") from exc
            if d.shape != tuple(W.shape):
                raise InvalidInput(
                    f"delta {i} (layer {d.layer}) has shape {d.shape}, but {what} is "
                    f"{tuple(W.shape)}{' [d_mlp, d_model]' if d.param is None else ''} "
                    "(weights unchanged)"
                )
            M = d.matrix(torch.float32).to(W.device)
            if not torch.isfinite(M).all():
                raise InvalidInput(
                    f"delta {i} (layer {d.layer}{'' if d.param is None else ', ' + d.param}) "
                    "contains NaN or inf: refusing to apply it (weights unchanged)"
                )
            planned.append((d.key, M))
        return planned

    def apply(self, model: HookedModel) -> Edit:
        """Add the deltas to ``model``'s weights; returns ``self``.

        Refused (InvalidInput, weights unchanged) for a model with another fingerprint, an
        unknown layer, a wrong shape, a delta with NaN/inf, or an edit that is already
        applied. If anything fails while adding (e.g. weights overflowing to inf), every
        touched layer is restored exactly before the error propagates.
        """
        if self.is_applied:
            raise InvalidInput(f"{self!r} is already applied; undo it before applying it again")
        planned = self._planned(model)
        originals = snapshot_targets(model, [key for key, _ in planned])
        try:
            with torch.no_grad():
                for key, M in planned:
                    W = target_tensor(model, key)
                    add_to_weight(W, M)
                    if not torch.isfinite(W).all():
                        where = f"layer {key}" if isinstance(key, int) else key
                        raise EditFailed(
                            f"{where}: adding the delta made weights NaN or inf (overflow); "
                            "all layers restored"
                        )
        except BaseException:
            restore_targets(model, originals)
            raise
        self._originals, self._model = originals, model
        stack = getattr(model, _STACK_ATTR, None)
        if stack is None:
            stack = []
            setattr(model, _STACK_ATTR, stack)
        stack.append(self)
        return self

    def undo(self, model: HookedModel) -> None:
        """Copy the weights saved by :meth:`apply` back: the touched layers become bit-for-bit
        what they were. Refused if not applied to ``model``, or if an edit applied later to an
        overlapping layer is still applied (undo that one first)."""
        if not self.is_applied:
            raise InvalidInput(f"{self!r} is not applied; nothing to undo")
        if model is not self._model:
            raise InvalidInput("this edit is applied to another model object; undo it there")
        stack: list[Edit] = getattr(model, _STACK_ATTR, [])
        later = stack[stack.index(self) + 1 :] if self in stack else []
        blocking = [e for e in later if set(e.layers) & set(self.layers)]
        if blocking:
            raise InvalidInput(
                f"{blocking[-1]!r} was applied after this edit to overlapping layers and is "
                "still applied: undo edits in reverse order"
            )
        restore_targets(model, self._originals)  # type: ignore[arg-type]
        if self in stack:
            stack.remove(self)
        self._originals, self._model = None, None

    @contextmanager
    def applied(self, model: HookedModel) -> Iterator[Edit]:
        """``with edit.applied(model): ...`` applies the edit and always undoes it."""
        self.apply(model)
        try:
            yield self
        finally:
            self.undo(model)

    def export(self, model: HookedModel, folder: str | Path) -> Path:
        """Write ``model`` with this edit applied as a Hugging Face folder that
        ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` loads without factscope
        (see :mod:`editing.edits.export`); the model is left as it was. Returns the folder."""
        from editing.edits.export import check_export_folder, export_model

        check_export_folder(folder)
        origin = {
            "method": self.method,
            "layers": self.layers,
            "parameters": self.parameters,
            "requests": [r.to_dict() for r in self.requests],
        }
        with self.applied(model):
            return export_model(model, folder, origin)

    # ------------------------------------------------------------------ save / load

    def save(self, folder: str | Path) -> Path:
        """Write ``deltas.safetensors`` and ``edit.json`` (method, model, requests,
        hyper-parameters, metadata, delta layout) into ``folder``; returns the folder
        (:func:`editing.edits.format.write_edit`)."""
        return write_edit(self, folder)

    @classmethod
    def load(cls, folder: str | Path) -> Edit:
        """Read an edit written by :meth:`save` (not applied to anything yet). Files of
        format version 1 (down-projection deltas only) load unchanged; a newer version is
        refused with a one-line error (:func:`editing.edits.format.read_edit`)."""
        return cls(**read_edit(folder))

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_weights(
        cls,
        model: HookedModel,
        before: dict[TargetKey, torch.Tensor],
        method: str,
        requests: Sequence[EditRequest],
        hparams: Any,
        *,
        metadata: dict | None = None,
    ) -> Edit:
        """Dense deltas ``now - before[key]`` from weights changed in place (as fine-tuning
        does): ``before`` maps layers (their down-projections) and/or parameter names to the
        values before (:func:`editing.params.snapshot_targets`). The model is not changed;
        restore it yourself (e.g. with :func:`editing.params.restore_targets`). Applying the
        edit to the restored model gives ``before + (after - before)``, equal to ``after`` up to
        float rounding."""

        def delta(key: TargetKey) -> LayerDelta:
            change = (target_tensor(model, key).detach() - before[key]).clone()
            if isinstance(key, int):
                return LayerDelta(key, dense=change)
            return LayerDelta(parse_name(key), dense=change, param=key)

        layers = sorted(k for k in before if isinstance(k, int))
        names: list[TargetKey] = [k for k in before if not isinstance(k, int)]
        deltas = [delta(k) for k in [*layers, *names]]
        return cls(
            deltas=deltas,
            method=method,
            requests=list(requests),
            hparams=hparams,
            model_fingerprint=fingerprint(model),
            model_name=model_name(model),
            metadata=metadata or {},
        )

    @classmethod
    def combine(cls, edits: Sequence[Edit], method: str | None = None) -> Edit:
        """One edit holding the deltas of ``edits`` in order (e.g. sequential ROME edits);
        all must be for the same model."""
        if not edits:
            raise InvalidInput("nothing to combine")
        fps = {e.model_fingerprint for e in edits}
        if len(fps) != 1:
            raise InvalidInput(f"cannot combine edits made for different models: {sorted(fps)}")
        first = edits[0]
        return cls(
            deltas=[d for e in edits for d in e.deltas],
            method=method or first.method,
            requests=[r for e in edits for r in e.requests],
            hparams=first.hparams,
            model_fingerprint=first.model_fingerprint,
            model_name=first.model_name,
            metadata={"combined": [e.metadata for e in edits]},
            keys={
                L: torch.cat([e.keys[L] for e in edits if L in e.keys])
                for L in sorted({L for e in edits for L in e.keys})
            },
        )
