"""The method registry: what the CLI, :func:`editing.api.make_edit`, hyper-parameter loading
and the evaluation runner know about each editing method.

An :class:`EditMethod` names a method and holds its hyper-parameter class, its edit function,
whether it edits a batch in one computation, and the fields its name fixes (``ft-l`` is
fine-tuning with ``mode="constrained"``). Every edit function has one signature,
:data:`EditFn`: it takes the model, the requests prepared once by
:func:`editing.requests.prepared.prepare_requests`, the resolved hyper-parameters and
:class:`EditInputs`, may change weights while it works, and returns an
:class:`~editing.edits.edit.Edit` (``make_edit`` restores the weights around it).

Adding a method: one module under :mod:`editing.methods` defining its ``Hparams`` subclass
and edit function and an ``EditMethod`` value, one line in ``editing/methods/__init__.py``,
and one default file ``editing/hparams_defaults/{family}_default.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from editing.edits.edit import Edit
from editing.hparams import Hparams, read_hparams
from editing.requests.prepared import PreparedRequest
from editing.statistics.keys import Stats
from tracing.errors import InvalidInput
from tracing.models import HookedModel


@dataclass(frozen=True)
class EditInputs:
    """What a caller may give a method besides requests and hyper-parameters: precomputed
    second moments by layer (ROME-like methods), whether to show progress bars, and whether
    every torchrun rank is making this same edit, so that batched methods may split their
    per-request target optimisation across ranks (``shard_targets``); a folder where batched
    methods keep each request's finished target, so that an interrupted batch resumes
    (``target_cache``, :class:`editing.targets.cache.TargetCache`); and, for methods that
    protect earlier edits (AlphaEdit), the sum ``K^T K`` of the keys of the edits already made
    in a sequence, by layer (``preserved_keys``, [d_mlp, d_mlp]); for methods that carry
    state along a stream (UltraEdit's lifelong normalisation), the state the stream has
    reached, as JSON data (``lifelong_state``; None: a fresh stream); and subjects whose
    known facts must not enter a knowledge-aware preserved set besides the batch's own (the
    whole stream's, ``exclude_subjects``: AlphaEdit's ``knowledge_share``)."""

    stats: Stats | None = None
    progress: bool = False
    shard_targets: bool = False
    target_cache: Path | None = None
    preserved_keys: Mapping[int, torch.Tensor] | None = None
    lifelong_state: Mapping[str, Any] | None = None
    exclude_subjects: Sequence[str] = ()


#: The signature of every method's edit function: ``(model, prepared, hp, inputs) -> Edit``.
EditFn = Callable[[HookedModel, Sequence[PreparedRequest], Any, EditInputs], Edit]


@dataclass(frozen=True)
class EditMethod:
    """One registered editing method.

    ``batched``: the method edits all requests of a unit in one computation (MEMIT); others
    edit one request at a time (ROME applies them in sequence within one call).
    ``uses_templates``: requests are prepared in the model's own context templates
    (``hp.context_templates``); otherwise only the bare prompt is used. ``fixed``: fields
    of ``hparams`` this name forces (``ft-l``: ``mode="constrained"``); ``file_defaults``:
    fields it implies when reading a default file (``ft``: no bound). Neither applies when a
    caller overrides ``mode`` explicitly. ``check``: refuses hyper-parameters that cannot
    work on a model (e.g. an edit layer with no path to the loss), before any work.
    ``protects_edits``: in a sequence, the method takes the keys of the edits already made
    (``EditInputs.preserved_keys``) and keeps them mapped as they are (AlphaEdit).
    ``lifelong``: in a sequence, the method carries a state from batch to batch
    (``EditInputs.lifelong_state``, returned in ``Edit.metadata["lifelong_state"]``:
    UltraEdit's normalisation statistics).
    """

    name: str
    hparams: type[Hparams]
    edit: EditFn
    batched: bool
    uses_templates: bool
    summary: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    file_defaults: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[HookedModel, Any], None] | None = None
    protects_edits: bool = False
    lifelong: bool = False

    def load_hparams(
        self, model_name: str | None = None, path: str | Path | None = None, **overrides: Any
    ) -> Hparams:
        """This method's hyper-parameters: the file ``path``, else the shipped defaults for
        ``model_name``; ``overrides`` replace fields (see :func:`editing.hparams.read_hparams`)."""
        implied = {**self.file_defaults, **self.fixed}
        return read_hparams(self.hparams, model_name, path, fixed=implied, **overrides)


def lookup(registry: Mapping[str, EditMethod], name: str) -> EditMethod:
    """The method called ``name`` (case-insensitive), or an error listing the known ones."""
    key = str(name).lower()
    if key not in registry:
        raise InvalidInput(f"unknown editing method {name!r}; expected one of {list(registry)}")
    return registry[key]
