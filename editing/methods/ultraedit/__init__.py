"""UltraEdit (Gu et al. 2025): closed-form lifelong editing from hidden states and their
gradients, with normalisation statistics carried across the batches of a stream.

* :mod:`~editing.methods.ultraedit.hparams`: :class:`UltraEditHparams`;
* :mod:`~editing.methods.ultraedit.normaliser`: the lifelong normalisation state, which a
  stream carries from batch to batch (in each Edit's ``metadata["lifelong_state"]``);
* :mod:`~editing.methods.ultraedit.update`: the update rule and the edit function.

:func:`make_stream_edit` is :func:`editing.api.make_edit` for one batch of a stream: it
takes the state the stream has reached. ``make_edit(model, requests, "ultraedit")`` edits
from a fresh state (the first batch of a stream).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from editing.edits.edit import Edit
from editing.edits.weights import restoring_weights
from editing.methods.registry import EditInputs, EditMethod
from editing.methods.ultraedit.hparams import UltraEditHparams
from editing.methods.ultraedit.normaliser import LifelongNormaliser, LifelongState
from editing.methods.ultraedit.update import STATE_KEY, edit_ultraedit
from editing.requests import EditRequest
from editing.requests.prepared import prepare_requests
from tracing.models import HookedModel

METHOD = EditMethod(
    name="ultraedit",
    hparams=UltraEditHparams,
    edit=edit_ultraedit,
    batched=True,
    uses_templates=False,
    summary="closed-form updates from hidden states and gradients, lifelong normalisation",
    lifelong=True,
)


def make_stream_edit(
    model: HookedModel,
    requests: Sequence[EditRequest],
    hp: UltraEditHparams,
    state: Mapping[str, Any] | None,
) -> Edit:
    """One UltraEdit batch of a stream that has reached lifelong ``state`` (JSON data, as in
    an earlier batch's ``edit.metadata["lifelong_state"]``; None: the first batch). The
    model is unchanged; the Edit's metadata holds the state after the batch."""
    prepared = prepare_requests(model, list(requests), ("{}",))
    with restoring_weights(model, hp.layers or [], always=True):
        return edit_ultraedit(model, prepared, hp, EditInputs(lifelong_state=state))


__all__ = [
    "METHOD",
    "STATE_KEY",
    "LifelongNormaliser",
    "LifelongState",
    "UltraEditHparams",
    "edit_ultraedit",
    "make_stream_edit",
]
