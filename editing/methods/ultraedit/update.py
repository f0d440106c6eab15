"""UltraEdit's update (Gu et al. 2025, "Training-, Subject-, and Memory-Free Lifelong
Editing"), one batch of a stream at a time.

For each request the edit prompt is followed by the new target (teacher forcing) and the
cross-entropy of the target tokens is taken, averaged over the requests of a chunk of
``chunk_size`` (the batch ordered longest first, as the official loader does). One forward
and backward pass per chunk gives, at every answer-predicting position (the prompt's last
token up to the target's second-to-last) and for every edited down-projection, the key
``k`` (the down-projection's input) and the gradient ``g`` of the loss with respect to its
output. Every chunk's rows ``[k, g]`` are merged into the stream's lifelong normaliser
(:mod:`editing.methods.ultraedit.normaliser`; one per weight shape, so all edited
down-projections share one), and then, per layer, with ``[k_hat, g_hat]`` the normalised rows,

    v_i     = -lr * ||k_hat_i||^2 * g_hat_i                 (the pseudo value shift)
    Delta W = (K^T K + ridge I)^-1 K^T V                    (K: the raw keys, rows k_i)

in factscope's ``[d_mlp, d_model]`` orientation of the down-projection (the official
``param_shift``, which it adds transposed to a Linear's weight). All layers' rows come from
the same passes on the weights as they stand before the batch (no layer-by-layer
re-reading as in MEMIT), and the update uses nothing but this batch's rows and the
normaliser: no second-moment statistics, no subject positions, no memory of earlier edits.
Computed in float64 through the push-through form ``K^T (K K^T + ridge I)^-1`` (an
``[N, N]`` system for ``N`` answer tokens), returned as low-rank factors. With
``rect_keep`` set (RECT, off by default) each layer's ``Delta W`` is sparsified against the
weight as it stands before the batch (:func:`editing.methods.stabilisers.rect_filter`) and
returned dense; UltraEdit's rule is an additive ``Delta W`` per layer, so RECT applies as
it does to MEMIT.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from jaxtyping import Float

from editing.edits.edit import Edit, LayerDelta
from editing.methods.registry import EditInputs
from editing.methods.stabilisers import rect_filter
from editing.methods.ultraedit.hparams import UltraEditHparams
from editing.methods.ultraedit.normaliser import (
    LifelongNormaliser,
    LifelongState,
    state_from_dict,
    state_to_dict,
)
from editing.requests.prepared import PreparedRequest
from tracing.errors import EditFailed, InvalidHparams
from tracing.forward import padded
from tracing.models import (
    HookedModel,
    check_layer,
    down_proj,
    final_logprobs,
    fingerprint,
    hook_name,
    model_device,
    model_name,
    n_layers,
)

#: ``Edit.metadata`` key of the lifelong state after the batch (what the next one starts from).
STATE_KEY = "lifelong_state"


class _Stop(Exception):
    """Ends a forward pass once the last residual state is captured."""


def chunk_order(prepared: Sequence[PreparedRequest], chunk_size: int) -> list[list[int]]:
    """Request indices in chunks of ``chunk_size``: longest teacher-forced sequence first
    (stable, as the official loader's sort by attention-mask length)."""
    length = [len(p.plain.ids) + len(p.target) - 1 for p in prepared]
    order = sorted(range(len(prepared)), key=lambda i: -length[i])
    return [order[i : i + chunk_size] for i in range(0, len(order), chunk_size)]


def answer_rows(
    model: HookedModel, prepared: Sequence[PreparedRequest], layers: Sequence[int]
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For one chunk of requests, per layer: the keys ``[m, d_mlp]`` and the gradients of the
    chunk's mean target cross-entropy with respect to the down-projection output
    ``[m, d_model]`` at the ``m`` answer-predicting positions (request by request, position
    by position), float64. The weights are not changed."""
    seqs = [list(p.plain.ids) + list(p.target[:-1]) for p in prepared]
    starts = [len(p.plain.ids) - 1 for p in prepared]
    rows = [(i, starts[i] + j) for i, p in enumerate(prepared) for j in range(len(p.target))]
    labels = [p.target[j] for p in prepared for j in range(len(p.target))]
    b_idx = torch.tensor([r[0] for r in rows])
    t_idx = torch.tensor([r[1] for r in rows])
    keys: dict[int, torch.Tensor] = {}
    zeros: dict[int, torch.Tensor] = {}
    final: list[torch.Tensor] = []
    last = hook_name(model, "resid", n_layers(model) - 1)

    def key_hook(L: int):  # noqa: ANN202
        def hook(x: torch.Tensor, hook: object) -> torch.Tensor:
            keys[L] = x.detach()[b_idx.to(x.device), t_idx.to(x.device)]
            return x

        return hook

    def out_hook(L: int):  # noqa: ANN202
        def hook(x: torch.Tensor, hook: object) -> torch.Tensor:
            zeros[L] = torch.zeros_like(x, requires_grad=True)
            return x + zeros[L]  # d loss / d zeros[L] = d loss / d output

        return hook

    def stop(x: torch.Tensor, hook: object) -> None:
        final.append(x)
        raise _Stop

    fwd = [(hook_name(model, "mlp_key", L), key_hook(L)) for L in layers]
    fwd += [(hook_name(model, "mlp_raw", L), out_hook(L)) for L in layers]
    fwd.append((last, stop))
    tokens = padded(seqs, device=model_device(model))
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd):
        try:
            model(tokens, use_cache=False)
        except _Stop:
            pass
        resid = final[0][b_idx.to(final[0].device), t_idx.to(final[0].device)]
        logp = final_logprobs(model, resid[None])[0]
        target = torch.tensor(labels, device=logp.device)
        loss = -logp[torch.arange(len(labels), device=logp.device), target].mean()
        grads = torch.autograd.grad(loss, [zeros[L] for L in layers])
    out = {}
    for L, g in zip(layers, grads, strict=True):
        out[L] = (keys[L].double(), g[b_idx.to(g.device), t_idx.to(g.device)].double())
    return out


def shape_key(d_in: int, d_out: int) -> str:
    """The lifelong state's key of a weight with ``d_in`` inputs and ``d_out`` outputs."""
    return f"{d_in},{d_out}"


def pseudo_values(
    norm: LifelongNormaliser,
    keys: Float[torch.Tensor, "m d_in"],
    grads: Float[torch.Tensor, "m d_out"],
    lr: float,
) -> Float[torch.Tensor, "m d_out"]:
    """``v_i = -lr ||k_hat_i||^2 g_hat_i`` with ``[k_hat, g_hat]`` the normalised rows."""
    z = norm(torch.cat([keys, grads], dim=-1).cpu())
    k_hat, g_hat = z[:, : keys.shape[1]], z[:, keys.shape[1] :]
    return (-lr * k_hat.pow(2).sum(-1, keepdim=True) * g_hat).to(keys.device)


def ridge_left(keys: Float[torch.Tensor, "m d_in"], ridge: float) -> Float[torch.Tensor, "d_in m"]:
    """``(K^T K + ridge I)^-1 K^T`` as ``K^T (K K^T + ridge I)^-1`` (float64; equal by the
    push-through identity), so the update is ``left @ V``."""
    K = keys.double()
    small = K @ K.T
    small.diagonal().add_(ridge)
    return torch.linalg.solve(small, K).T  # small is symmetric: (small^-1 K)^T = K^T small^-1


def edit_ultraedit(
    model: HookedModel,
    prepared: Sequence[PreparedRequest],
    hp: UltraEditHparams,
    inputs: EditInputs,
) -> Edit:
    """An UltraEdit batch of all ``prepared`` requests (see the module docstring), starting
    from the lifelong state ``inputs.lifelong_state`` (None: a fresh stream). The returned
    Edit's ``metadata["lifelong_state"]`` is the state after this batch; the given state is
    not changed. The weights are not changed."""
    if not hp.layers:
        raise InvalidHparams("UltraEdit needs layers: set hp.layers (or pass layers=[...])")
    layers = sorted(check_layer(model, int(L)) for L in hp.layers)
    state: LifelongState = state_from_dict(inputs.lifelong_state)
    t0 = time.perf_counter()
    rows: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {L: [] for L in layers}
    for chunk in chunk_order(prepared, hp.chunk_size):
        got = answer_rows(model, [prepared[i] for i in chunk], layers)
        for L in layers:
            k, g = got[L]
            name = shape_key(k.shape[1], g.shape[1])
            if name not in state:
                state[name] = LifelongNormaliser.empty(k.shape[1] + g.shape[1], hp.norm_eps)
            state[name].update(torch.cat([k, g], dim=-1))
            rows[L].append((k, g))
    t1 = time.perf_counter()
    deltas, diag = [], []
    for L in layers:
        K = torch.cat([k for k, _ in rows[L]])
        G = torch.cat([g for _, g in rows[L]])
        V = pseudo_values(state[shape_key(K.shape[1], G.shape[1])], K, G, hp.lr)
        left = ridge_left(K, hp.ridge)
        if not (torch.isfinite(left).all() and torch.isfinite(V).all()):
            raise EditFailed(f"UltraEdit update for layer {L} is not finite")
        weight = down_proj(model, L)
        dev = weight.device
        if K.shape[0] < min(weight.shape):
            delta = LayerDelta(L, left=left.float().to(dev), right=V.float().to(dev))
        else:
            delta = LayerDelta(L, dense=(left @ V).float().to(dev))
        norm = float((left @ V).norm())
        if hp.rect_keep is not None:  # RECT: a sparse update, stored dense
            delta = LayerDelta(L, dense=rect_filter(delta.matrix(), weight, hp.rect_keep))
            norm = float(delta.matrix().norm())
        deltas.append(delta)
        diag.append({"layer": L, "rows": int(K.shape[0]), "update_norm": norm})
    meta = {
        "layers": diag,
        STATE_KEY: state_to_dict(state),
        "seconds_rows": round(t1 - t0, 3),
        "seconds_layers": round(time.perf_counter() - t1, 3),
    }
    return Edit(
        deltas=deltas,
        method="ultraedit",
        requests=[p.request for p in prepared],
        hparams=hp.to_dict(),
        model_fingerprint=fingerprint(model),
        model_name=model_name(model),
        metadata=meta,
    )
