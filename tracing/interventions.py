"""What an intervention patches, from which run, into which run.

An intervention is a set of :data:`State` ``(kind, layer, token)``. Every engine reads it the
same way:

* a state of :data:`~tracing.results.KINDS` (``resid``, ``mlp``, ``attn``) is *patched* from
  the source run into the base run: under ``direction="denoise"`` (the papers' tracing) from
  the clean run into the corrupted runs; under ``direction="noise"`` from each corrupted run
  into the clean run (one row per corrupted run, each getting its own corrupted state);
* a *frozen* state (:data:`FROZEN`: ``mlp-frozen``, ``attn-frozen``; :mod:`tracing.severing`)
  holds that module's output at its value in the first corrupted run (the papers'
  ``states_to_unpatch``).

:class:`Run` is one recorded base run (block inputs and keys/values) that the fast engine
re-uses; :func:`base_run` picks and makes it (lazily: the default trace makes nothing new).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tracing.errors import InvalidInput
from tracing.kv import BlockKV, run_recording
from tracing.models import HookedModel, hook_name, n_layers

if TYPE_CHECKING:
    from tracing.prepared_fact import PreparedFact

#: (kind, layer, token); kind "resid" at layer -1 is the input of block 0.
State = tuple[str, int, int]
#: Frozen-state kinds: a module's output held at its value in the first corrupted run.
FROZEN = {"mlp": "mlp-frozen", "attn": "attn-frozen"}
#: Every kind a :data:`State` may name.
STATE_KINDS = ("resid", "mlp", "attn", *FROZEN.values())


def frozen_module(kind: str) -> str | None:
    """``mlp`` / ``attn`` for a frozen-state kind, None for a patched one."""
    return next((m for m, f in FROZEN.items() if f == kind), None)


def state_hook(model: HookedModel, kind: str, layer: int) -> str:
    """Hook name where state (kind, layer) lives (a frozen state: its module's output)."""
    if kind == "resid" and layer == -1:
        return hook_name(model, "resid_pre", 0)
    return hook_name(model, frozen_module(kind) or kind, layer)


@dataclass
class Run:
    """A base run the fast engine re-uses: the residual stream entering each block (and the
    final one: ``n_layers + 1`` tensors of ``[rows, pos, d]``), each block's keys and values
    (None: the architecture takes no cache) and the metric's mean over its rows."""

    resid: list[torch.Tensor]
    kv: list[BlockKV] | None
    value: float


def base_key(prep: PreparedFact, states: Sequence[State]) -> str:
    """Which run ``states`` are patched into: ``"corrupted"`` (the prepared corrupted runs),
    ``"clean"`` (direction noise) or ``"second"`` (a severed intervention under the papers'
    noise: the scored pass draws the next noise, :mod:`tracing.severing`)."""
    if prep.direction == "noise":
        return "clean"
    frozen = any(frozen_module(k) for k, _, _ in states)
    if frozen and prep.severed_noise == "papers" and prep.corrupt_ids is None:
        return "second"
    return "corrupted"


def base_run(model: HookedModel, prep: PreparedFact, key: str) -> Run:
    """The run named by :func:`base_key` (made on first use and kept on ``prep``)."""
    if key == "corrupted":
        if prep.corrupt_kv is None and len(prep.corrupt_resid) == 1:
            raise InvalidInput("this prepared fact has no corrupted runs (prepared for AtP)")
        return Run(prep.corrupt_resid, prep.corrupt_kv, prep.corrupted_value)
    if key not in prep.runs:
        from tracing.prepared_fact import metric_values

        S = prep.samples
        if key == "clean":
            resid, kv = run_recording(
                model, prep.clean_input, prep.block_kwargs, 0, n_layers(model)
            )
            resid = [x.expand(S, *x.shape[1:]) for x in resid]
            kv = (
                None
                if kv is None
                else [(k.expand(S, *k.shape[1:]), v.expand(S, *v.shape[1:])) for k, v in kv]
            )
            value = prep.clean_value
        elif key == "second":
            from tracing.noise import add_noise

            resid, kv = run_recording(
                model,
                add_noise(prep.clean_input, prep.second_noise(), prep.span),
                prep.block_kwargs,
                0,
                n_layers(model),
            )
            with torch.no_grad():
                value = metric_values(model, prep, resid[-1]).mean().item()
        else:
            raise InvalidInput(f"unknown base run {key!r}")
        prep.runs[key] = Run(resid, kv, float(value))
    return prep.runs[key]


def corrupted_states(model: HookedModel, prep: PreparedFact) -> dict[str, torch.Tensor]:
    """The first corrupted runs' MLP and attention outputs at every layer (``[rows, pos, d]``
    per hook name), recorded on first use by one more pass of the corrupted runs."""
    if prep.states is None:
        names = {
            hook_name(model, k, layer) for k in ("mlp", "attn") for layer in range(n_layers(model))
        }
        store: dict[str, torch.Tensor] = {}

        def saver(name: str):
            def save(x: torch.Tensor, hook) -> torch.Tensor:
                store[name] = x.detach()
                return x

            return save

        with model.hooks(fwd_hooks=[(nm, saver(nm)) for nm in names]):
            run_recording(model, prep.corrupt_resid[0], prep.block_kwargs, 0, n_layers(model))
        prep.states = store
    return prep.states


def state_source(model: HookedModel, prep: PreparedFact, state: State) -> torch.Tensor:
    """Where ``state``'s patched value comes from, ``[1 or rows, pos, d]`` (one row: every
    row gets it; ``rows``: row ``r`` of each intervention gets row ``r``)."""
    kind, layer, _ = state
    name = state_hook(model, kind, layer)
    if frozen_module(kind) is not None:
        return corrupted_states(model, prep)[name]
    if prep.direction == "denoise":
        return prep.clean[name]
    if kind == "resid":  # the corrupted runs' block outputs are the next blocks' inputs
        return prep.corrupt_resid[layer + 1]
    return corrupted_states(model, prep)[name]
