"""Severed paths (Meng et al. 2022, Fig. 3c and §2.2): how much of a hidden state's effect
goes through the MLPs (or the attention) at its token.

A severed trace of kind ``resid/mlp-severed`` restores the hidden state at (token t, layer
L) from the clean run, exactly as ``resid`` does, and at the same time holds the MLP outputs
*at token t* at their corrupted values, so the restored state can act on the answer only
through the attention (and the residual stream itself): the difference to the ``resid``
trace is the effect the MLPs at that token mediate. ``resid/attn-severed`` holds the
attention outputs at t instead. Other tokens' modules run normally.

**What the papers' code does** (kmeng01/rome, ``trace_with_repatch`` and
``trace_important_states_3`` of ``notebooks/causal_trace_frozen_mlp_attn.ipynb``), which is
the default here:

* the frozen states are the module's outputs at token t at *every* layer, 0 to the last
  (at layers up to L the restored state overwrites what they did to token t itself; before
  L they still feed later tokens' attention through token t's keys and values);
* two passes: the first runs the corrupted batch unpatched and records the module outputs;
  the second restores and freezes, with the recorded outputs of the same noise row;
* the noise generator is seeded once for both passes and draws again in the second pass,
  so the scored pass's noise is the *second* draw of ``RandomState(seed)``, while the frozen
  outputs and every unsevered trace use the first. ``severed_noise="papers"`` (default)
  reproduces that; ``severed_noise="same"`` (a named departure: the papers' stated intent,
  "stuck in the corrupted state") scores with the first draw too, so freezing the layers up
  to L is a no-op and a cell before the subject is exactly ``p_corrupted``. Token
  replacement has one corrupted run, so both readings agree there.

**Parallel blocks** (GPT-J, GPT-NeoX/Pythia): attention and MLP read the same residual
stream, ``h_{L+1} = h_L + attn(ln1 h_L) + mlp(ln2 h_L)``. Severing the MLP at token t holds
``mlp(ln2 h)`` at its corrupted value in every block at t, and nothing else: the restored
state still reaches the answer through the residual stream and through the attention (of
token t and, via t's keys and values, of later tokens). In a serial block the MLP reads the
stream *after* the same block's attention; in a parallel one both read the block's input,
so there severing the MLP removes only what the MLPs at t compute from the restored state,
never an attention output passed through an MLP. Severing the attention is symmetric.
The definition (which outputs are held, at which token, from which run) is the same for
every architecture; the tests check it against a plain loop on every tiny family.

**Restored windows.** A severed kind's window (default 1, as ``resid``) is a window of
restored hidden states; a window that reaches the last layer from every layer (``window >=
2 n - 1``) leaves no later module to sever and is refused.

**Attribution patching** of a severed cell is the first-order term of the same restoration
with the gradient path through the frozen modules at token t cut (their outputs treated as
constants): one backward pass per token (:func:`severed_effects`). It is expressible only
when the frozen values are those of the run AtP linearises around, the corrupted run: with
``severed_noise="same"`` or token replacement; under the papers' two-draw noise the severed
run is a mixture of two noise draws that no single corrupted pass gives, and AtP is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from tracing.errors import InvalidInput
from tracing.forward import run_blocks
from tracing.interventions import FROZEN, State, state_hook
from tracing.models import HookedModel, n_layers
from tracing.results import KINDS, SEVERED_KINDS

if TYPE_CHECKING:
    from tracing.prepared_fact import PreparedFact

SEVERED_NOISE = ("papers", "same")
DEFAULT_SEVERED_NOISE = "papers"


def parse_kind(kind: str) -> tuple[str, str] | None:
    """``(restored kind, severed module)`` of a severed kind (``resid/mlp-severed`` ->
    ``("resid", "mlp")``); None for a plain kind. Refuses a severing that does not apply."""
    if "/" not in kind and not kind.endswith("-severed"):
        return None
    base, _, rest = kind.partition("/")
    module = rest.removesuffix("-severed")
    if not rest.endswith("-severed") or module not in FROZEN:
        raise InvalidInput(
            f"unknown kind {kind!r}; severed kinds are written like {SEVERED_KINDS[0]!r}: "
            f"one of {SEVERED_KINDS}"
        )
    if base != "resid":
        raise InvalidInput(
            f"severing applies to restored hidden states only (resid), not {base!r}: "
            f"{kind!r} would hold at corrupted values the very outputs it restores or their "
            f"window; use one of {SEVERED_KINDS}"
        )
    return base, module


def check_kind(kind: str) -> str:
    """``kind`` if it is a known plain or severed kind; else a one-line error."""
    if parse_kind(kind) is None and kind not in KINDS:
        raise InvalidInput(f"unknown kind {kind!r}; expected one of {(*KINDS, *SEVERED_KINDS)}")
    return kind


def check_window(kind: str, window: int, n: int) -> None:
    """Refuse a severed kind's window that restores up to the last layer from every layer
    (nothing left to sever)."""
    if parse_kind(kind) is not None and -(-window // 2) >= n:
        raise InvalidInput(
            f"window {window} for {kind!r} restores the hidden states up to the last layer "
            f"from every layer of this {n}-layer model: nothing is left to sever (use a window "
            f"below {2 * n - 1})"
        )


def severed_grid(kind: str, n_tokens: int, n: int, window: int) -> list[list[State]]:
    """Interventions of a [token x layer] severed trace, row-major: at (t, L) the hidden
    states of the window centred on L restored, and the module's output at t frozen in
    every layer (the papers' ``states_to_unpatch``)."""
    from tracing.trace import window_layers

    parsed = parse_kind(kind)
    assert parsed is not None
    frozen = FROZEN[parsed[1]]
    return [
        [("resid", lw, t) for lw in window_layers(layer, window, n)]
        + [(frozen, lf, t) for lf in range(n)]
        for t in range(n_tokens)
        for layer in range(n)
    ]


def check_atp(prep: PreparedFact, kinds: tuple[str, ...] | list[str]) -> None:
    """Refuse AtP of severed kinds where it is not expressible (see the module doc)."""
    if (
        any(parse_kind(k) for k in kinds)
        and prep.severed_noise == "papers"
        and (prep.corrupt_ids is None)
    ):
        raise InvalidInput(
            "AtP cannot estimate severed kinds under the papers' two-draw noise (the severed "
            "run mixes two noise draws); pass severed_noise='same' (--severed-noise same) or "
            "use --method fast"
        )


def severed_effects(model: HookedModel, prep: PreparedFact, module: str, token: int) -> np.ndarray:
    """First-order effects ``(h_clean - h_s) . dlog p_s/dh`` of restoring the hidden state
    at ``token`` after each layer, with the outputs of ``module`` at ``token`` treated as
    constants in every layer (detached): ``[samples, layers]``, one forward and backward
    pass of the corrupted runs; kept on ``prep``."""
    key = (module, token)
    if key in prep.severed_attribution:
        return prep.severed_attribution[key]
    from tracing.attribution import sample_effects

    n = n_layers(model)
    resid = {state_hook(model, "resid", layer): layer for layer in range(n)}
    cut = {state_hook(model, FROZEN[module], layer) for layer in range(n)}
    deltas: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}

    def add_delta(name: str):
        def hook(x: torch.Tensor, hook) -> torch.Tensor:
            seen[name] = x.detach()
            deltas[name] = torch.zeros_like(x, requires_grad=True)
            return x + deltas[name]

        return hook

    def detach_token(x: torch.Tensor, hook) -> torch.Tensor:
        y = x.clone()
        y[:, token] = x[:, token].detach()
        return y

    hooks = [(nm, add_delta(nm)) for nm in resid] + [(nm, detach_token) for nm in cut]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        h = run_blocks(model, prep.corrupt_resid[0].detach(), prep.block_kwargs, 0)
        logp = torch.log_softmax(model_logits(model, h), -1)[:, prep.answer_id]
        order = list(resid)
        grads = torch.autograd.grad(logp.sum(), [deltas[nm] for nm in order], allow_unused=True)
    out = np.zeros((prep.samples, n))
    for nm, g in zip(order, grads, strict=True):
        if g is not None:
            out[:, resid[nm]] = sample_effects(prep.clean[nm], seen[nm], g)[:, token]
    prep.severed_attribution[key] = out
    return out


def model_logits(model: HookedModel, h: torch.Tensor) -> torch.Tensor:
    """Float32 last-position logits of a final residual stream."""
    from tracing.models import final_logits

    return final_logits(model, h[:, -1:])[:, 0].float()
