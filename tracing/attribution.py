"""Attribution patching (AtP) for causal tracing with ROME's Gaussian-noise subject corruption.

Exact causal tracing (Meng et al. 2022) restores one clean state at a time into the noisy
runs and reads the answer's probability: one (partial) forward pass per (token, layer, kind)
cell. Attribution patching (Nanda 2023; Syed et al. 2023; Kramár et al. 2024) replaces every
one of those runs by the first-order Taylor term around the corrupted run. For noise sample
``s`` and a state ``h`` (a block output, an MLP output or an attention output at one token)

    p_s(h restored) ≈ p_s + (h_clean − h_s) · ∂p_s/∂h

where ``p_s`` is the answer's probability in that noisy run. One forward and one backward
pass of the ``S`` noisy runs (one batch of ``S`` rows: rows do not interact) give ``∂p_s/∂h``
for every state at once, so a three-kind trace costs about three forward passes instead of
one per cell. A cell's score is ``p_corrupted + mean_s (h_clean − h_s) · ∂p_s/∂h``: the
estimate of the same quantity the exact engine measures (the mean restored probability), in
the same :class:`~tracing.results.TraceResult`, marked approximate. It is not clipped to
``[0, 1]``: an estimate outside it is a visible first-order failure, not a probability.

**Probability or log-odds.** The trace reads ``p``; the papers' AtP steps linearly in ``p``,
and ``∂p/∂logit_a = p (1 − p)`` makes that step vanish where the corrupted runs give the
answer almost no probability, which is where tracing works (the saturation failure of AtP).
factscope steps in the answer's log-odds by default and maps back through the sigmoid
(:data:`SPACES`: same first-order term, bounded, exponential where p is small); ``"prob"``
keeps the papers' form. :data:`MIN_GRADIENT_PROB` is where factscope refuses to print
estimates built on a vanished gradient (:func:`check_gradient`).

**Windows.** ROME restores MLP and attention outputs over a window of layers ``W`` at one
token jointly. The first-order term of that joint restoration is

    Σ_{i∈W} (h_clean,i − h_i) · ∂p/∂h_i |_(W's other states held fixed)

because the patch overwrites each later window state whatever the earlier ones did: paths
from one window state through another are cut. The gradient with those cuts is a separate
backward pass per (token, top of window), as many passes as the exact trace has rows, so it
would remove AtP's advantage. ``atp`` uses the plain sum over the window of the single-state
terms (each first-order exact on its own; in log-odds space the sum is taken before the
sigmoid, see :data:`SPACES`): it counts the effect an earlier window layer has
*through* a later one twice (once in the earlier layer's gradient, once in the later layer's
own clean-minus-corrupted difference). So single-state cells (``resid``, window 1) are
first-order exact and wider windows carry a first-order error that grows with how much the
window's layers read one another at that token; the agreement benchmark
(``benchmarks/atp_agreement.py``) measures it, and ``atp+exact`` recomputes the cells a user
reads.

**AtP* corrections** (Kramár et al. 2024). *QK fix*: in AtP* a head's query or key is a node
whose change moves that head's attention logits bilinearly; the softmax saturates, so AtP*
recomputes the pattern exactly and linearises only after it. Our cells are whole block, MLP
and attention outputs, never a query or key on its own; a restored state reaches later
attention patterns through norms and every later block, where "recompute exactly" means
running those blocks: the exact trace. Not applied. *GradDrop*: AtP* drops the gradient
through each layer in turn to expose nodes whose direct and indirect effects cancel (AtP ≈ 0
but a large true effect); it yields an unsigned ranking score at one more backward pass per
layer, made for finding every important node, not for the signed probability a trace shows.
It could help ``atp+exact``'s ranking; not applied here because the cells users read (the
peak, its row and column) are recomputed exactly whatever their rank, and the benchmark's
top-10 overlap measures what the ranking misses.

**Severed kinds** (:mod:`tracing.severing`): the restored hidden state's first-order effect
with the gradient through the frozen modules at its token cut (one more backward pass per
token: :func:`tracing.severing.severed_effects`); not expressible under the papers' two-draw
noise (refused there).

**Exactness.** States before the subject are the same in clean and corrupted runs, so their
restoration changes nothing: their score is ``p_corrupted`` exactly, as the exact engine sets
it, and they are marked exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Bool, Float

from tracing.engine import State, state_hook
from tracing.errors import InvalidInput
from tracing.forward import run_blocks
from tracing.interventions import frozen_module
from tracing.models import HookedModel, decode, final_logits, n_layers
from tracing.results import KINDS

if TYPE_CHECKING:
    from tracing.prepared_fact import PreparedFact

#: Below this answer probability in every corrupted run, ∂p/∂h ∝ p vanishes: AtP's estimates
#: are ~0 whatever the true effect, so factscope refuses to report them (``atp``) or computes
#: every cell exactly (``atp+exact``).
MIN_GRADIENT_PROB = 1e-6
#: ``atp+exact``'s default share of each kind's cells recomputed exactly (by AtP rank).
DEFAULT_EXACT_TOP = 0.1
#: Where the first-order step is taken. ``"prob"``: the papers' AtP, linear in the answer's
#: probability, ``p_s + (h_clean − h_s)·∂p_s/∂h``. ``"logodds"`` (default, a named departure):
#: linear in its log-odds, ``σ(logit p_s + (h_clean − h_s)·∂log p_s/∂h / (1 − p_s))``. Both
#: have the same first-order term (``∂p = p ∂log p``), so both are first-order exact for one
#: state; they differ in how they extrapolate to the large restorations tracing is about. The
#: corruption is made to take the answer away (Space Needle: p 0.47 clean, 0.001 corrupted),
#: and a restoration that brings it back moves the answer's logit by several nats; p is
#: exponential in the logit there, so the prob-space line through p ≈ 0.001 stays near it
#: (measured: 0.012 at the cell where the exact restoration gives 0.47; Spearman with the
#: exact trace resid/mlp/attn 0.84/0.57/0.56), while the log-odds line follows the logit and
#: saturates at 1 (0.84 there; Spearman 0.90/0.68/0.67). One backward pass of log p serves
#: both (``∂p_s = p_s ∂log p_s``, without p's underflow for tiny p).
SPACES = ("logodds", "prob")
DEFAULT_SPACE = "logodds"


@dataclass
class Attribution:
    """First-order restoration effects of every state of one prepared fact, per noise sample.

    ``effects[kind][s, t, layer]`` is ``(h_clean − h_s) · ∂log p_s/∂h`` for the state (kind,
    layer, token t) in noisy run ``s``; ``embed[s, t]`` the same for the input of block 0
    (resid at layer -1). ``p[s]`` is the answer's probability in run ``s`` (the prob-space
    term is ``p_s`` times the log-space one: ``∂p = p ∂log p``); ``seconds`` the forward and
    backward time. ``p_corrupted`` is the mean of ``p`` as
    :func:`~tracing.prepared_fact.answer_probs` computes it (a prepared fact made without
    corrupted runs takes it from here).
    """

    effects: dict[str, np.ndarray]
    embed: np.ndarray
    p: np.ndarray
    seconds: float
    p_corrupted: float = math.nan

    @property
    def max_p(self) -> float:
        """The answer's largest probability over the corrupted runs (the gradient scale)."""
        return float(self.p.max())

    def effect(self, state: State) -> np.ndarray:
        """Per-sample log-space effect of restoring ``state``: ``[samples]``."""
        kind, layer, tok = state
        if kind == "resid" and layer == -1:
            return self.embed[:, tok]
        return self.effects[kind][:, tok, layer]


def attribute(model: HookedModel, prep: PreparedFact) -> Attribution:
    """One forward and backward pass of the noisy runs (a batch of ``prep.samples`` rows):
    the first-order effect of restoring each state, for every kind, token and layer.

    A zero tensor is added at every hook of :data:`~tracing.results.KINDS` and its gradient
    read, so what is differentiated is exactly the state the exact engine overwrites. Raises
    :class:`~tracing.errors.InvalidInput` when gradients do not reach the hooks (a model run
    without autograd, or a hook that detaches).
    """
    if torch.is_inference_mode_enabled():
        raise InvalidInput(
            "AtP needs gradients, which torch.inference_mode() turns off; call it outside "
            "inference mode or use an exact method (fast)"
        )
    t0 = time.perf_counter()
    n = n_layers(model)
    start = prep.span[0]
    names = {state_hook(model, k, layer): (k, layer) for k in KINDS for layer in range(n)}
    deltas: dict[str, torch.Tensor] = {}
    corrupted: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(x: torch.Tensor, hook: object) -> torch.Tensor:
            corrupted[name] = x.detach()
            deltas[name] = torch.zeros_like(x, requires_grad=True)
            return x + deltas[name]

        return hook

    h0 = prep.corrupt_resid[0].detach().clone().requires_grad_(True)
    with torch.enable_grad(), model.hooks(fwd_hooks=[(nm, make_hook(nm)) for nm in names]):
        h = run_blocks(model, h0, prep.block_kwargs, 0)
        logits = final_logits(model, h[:, -1:])[:, 0].float()
        logp = torch.log_softmax(logits, -1)[:, prep.answer_id]
        with torch.no_grad():  # answer_probs' definition, from the logits at hand
            p_corrupted = torch.softmax(logits.detach(), -1)[:, prep.answer_id].mean().item()
        missing = sorted(set(names) - set(deltas))
        if missing or not logp.requires_grad:
            raise InvalidInput(
                "AtP needs gradients through the model's hooks, and "
                + (f"hooks {missing[:3]} did not fire" if missing else "none reached the output")
                + "; use an exact method (fast)"
            )
        order = list(names)
        grads = torch.autograd.grad(
            logp.sum(), [h0, *(deltas[nm] for nm in order)], allow_unused=True
        )
    cut = [nm for nm, g in zip(order, grads[1:], strict=True) if g is None]
    if grads[0] is None or cut:
        raise InvalidInput(
            f"AtP needs gradients through the model's hooks, but none reached "
            f"{(cut or ['the embeddings'])[0]!r} (a hook or module detaches them); use an "
            "exact method (fast)"
        )
    shape = (prep.samples, len(prep.tokens), n)
    effects: dict[str, np.ndarray] = {k: np.zeros(shape) for k in KINDS}
    for nm, g in zip(order, grads[1:], strict=True):
        kind, layer = names[nm]
        effects[kind][:, :, layer] = sample_effects(prep.clean[nm], corrupted[nm], g)
    embed = sample_effects(prep.clean[state_hook(model, "resid", -1)], h0.detach(), grads[0])
    for arr in (*effects.values(), embed):
        arr[:, :start] = 0.0  # clean and corrupted states are the same before the subject
    return Attribution(
        effects=effects,
        embed=embed,
        p=logp.detach().double().exp().cpu().numpy(),
        seconds=time.perf_counter() - t0,
        p_corrupted=p_corrupted,
    )


def sample_effects(
    clean: Float[torch.Tensor, "1 pos d"],
    corrupted: Float[torch.Tensor, "samples pos d"],
    grad: Float[torch.Tensor, "samples pos d"],
) -> np.ndarray:
    """``(clean − corrupted_s) · grad_s`` per sample and position (``[samples, pos]``),
    in float64."""
    diff = clean.double() - corrupted.double()
    return (diff * grad.double()).sum(-1).cpu().numpy()


def check_gradient(model: HookedModel, prep: PreparedFact, attribution: Attribution) -> None:
    """Refuse estimates that are zeros only because the gradient vanished (see
    :data:`MIN_GRADIENT_PROB`): one line naming the answer and its probability."""
    if attribution.max_p < MIN_GRADIENT_PROB:
        raise InvalidInput(
            f"AtP cannot trace {decode(model, prep.answer_id)!r}: its probability in every "
            f"corrupted run is below {MIN_GRADIENT_PROB:g} (at most {attribution.max_p:.1e}), "
            "so its gradient vanishes and every estimate would read ~0; use --method fast "
            "or atp+exact"
        )


def atp_probs(
    model: HookedModel,
    prep: PreparedFact,
    interventions: Sequence[Sequence[State]],
    space: str = DEFAULT_SPACE,
) -> np.ndarray:
    """AtP estimate of each intervention's mean restored probability (see :data:`SPACES`):
    with ``e_s`` the sum of its states' per-sample log-space effects, ``"logodds"`` gives
    ``p_corrupted + mean_s [σ(logit p_s + e_s / (1 − p_s)) − p_s]`` and ``"prob"``
    ``p_corrupted + mean_s p_s e_s``. The attribution is computed once per prepared fact and
    kept on it."""
    if space not in SPACES:
        raise InvalidInput(f"unknown AtP space {space!r}; expected one of {SPACES}")
    if prep.attribution is None:
        prep.attribution = attribute(model, prep)
    attr = prep.attribution
    if math.isnan(prep.p_corrupted):  # prepared without corrupted runs: this pass is one
        prep.p_corrupted = attr.p_corrupted
    check_gradient(model, prep, attr)
    out = np.empty(len(interventions))
    for i, states in enumerate(interventions):
        e = sum((attr.effect(s) for s in states if not frozen_module(s[0])), np.zeros(prep.samples))
        frozen = {(m, t) for k, _, t in states if (m := frozen_module(k))}
        if frozen:  # severed: the restored hidden states' effects with the module cut
            from tracing.severing import severed_effects

            ((module, tok),) = frozen
            e = np.zeros(prep.samples)
            if tok >= prep.span[0]:  # before the subject nothing differs: no pass needed
                cut = severed_effects(model, prep, module, tok)
                e = sum((cut[:, lay] for k, lay, _ in states if k == "resid"), e)
        if space == "logodds":  # sigma(logit(p) + e / (1 - p)) - p, in a stable form
            odds = np.log(attr.p) - np.log1p(-attr.p) + e / (1.0 - attr.p)
            gain = 1.0 / (1.0 + np.exp(-odds)) - attr.p
        else:
            gain = attr.p * e
        out[i] = prep.p_corrupted + float(np.mean(gain))
    return out


def rank_cells(
    estimate: Float[np.ndarray, "tokens layers"],
    exact: Bool[np.ndarray, "tokens layers"],
    p_corrupted: float,
    top: float,
) -> list[tuple[int, int]]:
    """The cells ``atp+exact`` recomputes first: the ``ceil(top × cells)`` cells not yet
    exact with the largest ``|estimate − p_corrupted|`` (restorations estimated to matter
    most either way), then every cell of the estimate's peak row and column."""
    if not 0 <= top <= 1:
        raise InvalidInput(f"exact_top must be a fraction in [0, 1], got {top}")
    size = np.abs(estimate - p_corrupted)
    size[exact] = -np.inf
    k = min(int(math.ceil(top * estimate.size)), int((~exact).sum()))
    flat = np.argsort(-size, axis=None, kind="stable")[:k]
    cols = estimate.shape[1]
    cells = {(int(i) // cols, int(i) % cols) for i in flat}
    cells |= peak_cross(estimate)
    return sorted(c for c in cells if not exact[c])


def peak_cross(scores: Float[np.ndarray, "tokens layers"]) -> set[tuple[int, int]]:
    """Every cell of the row (token) and column (layer) through the largest score."""
    t, layer = np.unravel_index(int(np.argmax(scores)), scores.shape)
    rows, cols = scores.shape
    return {(int(t), j) for j in range(cols)} | {(i, int(layer)) for i in range(rows)}


def before_subject(prep: PreparedFact, n: int) -> Bool[np.ndarray, "tokens layers"]:
    """Cells whose restoration is a no-op (tokens before the subject): exact for any method."""
    mask = np.zeros((len(prep.tokens), n), dtype=bool)
    mask[: prep.span[0]] = True
    return mask


#: Cells of one kind: (token, layer) pairs.
Cells = list[tuple[int, int]]


def verify_top(
    estimates: dict[str, np.ndarray],
    exact: dict[str, np.ndarray],
    p_corrupted: float,
    top: float,
    measure: Callable[[dict[str, Cells]], dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``atp+exact``: for every kind, measure the cells :func:`rank_cells` picks (``measure``
    maps each kind's cells to exact scores, all kinds in one call: the fast engine then runs
    each restored token's interventions of every kind in one batch), then, while the peak of
    a kind's mixed map has a row or column cell that is still an estimate, measure those
    too. Returns (scores, exact masks) per kind; on return each kind's peak and its whole row
    and column are exact, so the peak a user reads is never an estimate that overshot.
    """
    scores = {k: np.asarray(e, dtype=np.float64).copy() for k, e in estimates.items()}
    masks = {k: np.asarray(m, dtype=bool).copy() for k, m in exact.items()}
    todo = {k: rank_cells(estimates[k], masks[k], p_corrupted, top) for k in estimates}
    while any(todo.values()):
        values = measure({k: cells for k, cells in todo.items() if cells})
        for k, cells in todo.items():
            for cell, value in zip(cells, values.get(k, []), strict=True):
                scores[k][cell], masks[k][cell] = value, True
        todo = {k: sorted(c for c in peak_cross(scores[k]) if not masks[k][c]) for k in scores}
    return scores, masks


def atp_exact_maps(
    model: HookedModel,
    prep: PreparedFact,
    grids: Mapping[str, Sequence[Sequence[State]]],
    top: float,
    measure: Callable[[list[Sequence[State]]], np.ndarray],
    notes: list[str],
    space: str = DEFAULT_SPACE,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The ``atp+exact`` maps of every kind in ``grids`` (each row-major [tokens x layers]
    interventions): AtP estimates, then the cells :func:`verify_top` picks measured by
    ``measure`` (the fast engine, given interventions). When the gradient vanishes (the
    answer has almost no probability in the corrupted runs) AtP cannot rank anything: every
    cell is measured and a note in ``notes`` says so. Returns (scores, exact masks)."""
    n, T = n_layers(model), len(prep.tokens)
    if prep.attribution is None:
        prep.attribution = attribute(model, prep)
    if prep.attribution.max_p < MIN_GRADIENT_PROB:
        notes.append(
            f"AtP's gradient vanishes for {decode(model, prep.answer_id)!r} (probability "
            f"below {MIN_GRADIENT_PROB:g} in every corrupted run): every cell measured exactly"
        )
        estimates = {k: np.full((T, n), prep.p_corrupted) for k in grids}
        top = 1.0
    else:
        estimates = {k: atp_probs(model, prep, g, space).reshape(T, n) for k, g in grids.items()}

    def by_kind(cells: dict[str, Cells]) -> dict[str, np.ndarray]:
        flat = [(k, c) for k, cs in cells.items() for c in cs]
        values = measure([grids[k][t * n + layer] for k, (t, layer) in flat])
        out: dict[str, list[float]] = {k: [] for k in cells}
        for (k, _), v in zip(flat, values, strict=True):
            out[k].append(float(v))
        return {k: np.array(v) for k, v in out.items()}

    exact = {k: before_subject(prep, n) for k in grids}
    return verify_top(estimates, exact, prep.p_corrupted, top, by_kind)
