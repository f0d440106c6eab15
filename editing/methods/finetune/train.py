"""The fine-tuning run (Zhu et al. 2020): choose the tensors, optimise, constrain, return
the change as an :class:`~editing.edits.edit.Edit`."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from editing.edits.edit import Edit
from editing.methods.finetune.batches import (
    Example,
    default_neutral_facts,
    encode,
    mean_logprob,
    mixed_schedule,
    pad,
    states_before,
)
from editing.methods.finetune.constraints import add_penalty_grads, project_linf_
from editing.methods.finetune.hparams import METHOD_NAMES, FTHparams
from editing.methods.registry import EditInputs, EditMethod
from editing.params import (
    TargetKey,
    block_parameters,
    grad_only,
    restore_targets,
    target_tensor,
)
from editing.requests.prepared import PreparedRequest
from editing.statistics.fisher import fisher_diagonal
from editing.targets.objective import loss_scaler
from tracing.errors import EditFailed, InvalidHparams, InvalidInput
from tracing.forward import capture_block_kwargs
from tracing.models import HookedModel, check_layer, down_proj, model_device

log = logging.getLogger(__name__)


def _down_proj_parameter(model: HookedModel, layer: int) -> torch.nn.Parameter:
    """The parameter behind ``down_proj(model, layer)`` (itself, or the Linear weight)."""
    view = down_proj(model, layer)
    param = view if view._base is None else view._base
    if not isinstance(param, torch.nn.Parameter):
        raise InvalidInput(f"layer {layer}: the down-projection is not a plain parameter")
    return param


def tuned_parameters(
    model: HookedModel, layers: Sequence[int], params: str
) -> tuple[dict[str, torch.nn.Parameter], list[TargetKey]]:
    """The tensors a run with ``params`` over ``layers`` tunes, by name (see
    :mod:`editing.params`), and the keys its :class:`~editing.edits.edit.Edit` deltas use: the
    layers for ``down_proj`` (deltas in ``[d_mlp, d_model]`` orientation, as ROME's), the
    names otherwise."""
    chosen: dict[str, torch.nn.Parameter] = {}
    for layer in layers:
        if params == "down_proj":
            target = _down_proj_parameter(model, layer)
            found = {n: p for n, p in block_parameters(model, layer, "mlp").items() if p is target}
            if len(found) != 1:
                raise InvalidInput(f"layer {layer}: cannot name the down-projection parameter")
            chosen.update(found)
        else:
            chosen.update(block_parameters(model, layer, params))
    keys: list[TargetKey] = list(layers) if params == "down_proj" else list(chosen)
    return chosen, keys


def _snapshot_views(
    model: HookedModel,
    keys: Sequence[TargetKey],
    params: Sequence[torch.Tensor],
    snapshot: Sequence[torch.Tensor],
) -> dict[TargetKey, torch.Tensor]:
    """``{key: the snapshot of target_tensor(model, key)}`` as
    :func:`editing.params.snapshot_targets` gives it, without copying the tuned tensors a
    second time: a tensor's own snapshot, or its transpose for a layer's down-projection
    that is a transposed view of a Linear weight (a copy only for another kind of view)."""
    out: dict[TargetKey, torch.Tensor] = {}
    for key in dict.fromkeys(keys):
        view = target_tensor(model, key)
        for p, s in zip(params, snapshot, strict=True):
            if view is p:
                out[key] = s
            elif (
                view._base is p
                and p.dim() == 2
                and view.shape == p.mT.shape
                and view.stride() == p.mT.stride()
                and view.storage_offset() == p.storage_offset()
            ):
                out[key] = s.mT
        if key not in out:
            out[key] = view.detach().clone()
    return out


def _neutral_examples(
    model: HookedModel,
    hp: FTHparams,
    prepared: Sequence[PreparedRequest],
    neutral_facts: Sequence[Sequence[str]] | None,
) -> tuple[list[tuple[str, ...]], list[Example]]:
    neutral: list[tuple[str, ...]] = []
    if hp.mode == "mixed" and hp.mixed_ratio > 0:
        if neutral_facts is None:
            want = max(16, math.ceil(hp.mixed_ratio * len(prepared)))
            subjects = [p.request.subject for p in prepared]
            neutral = list(default_neutral_facts(model, want, exclude_subjects=subjects))
            if not neutral:
                raise InvalidInput(
                    "mixed mode: the model answers none of the known facts right at top-1; "
                    "pass neutral_facts=[(prompt, answer), ...] explicitly"
                )
        else:
            neutral = [tuple(p) for p in neutral_facts]
        if not neutral:
            raise InvalidInput("mixed mode needs at least one neutral fact (neutral_facts empty)")
    for i, pair in enumerate(neutral):
        if not (
            isinstance(pair, tuple | list)
            and len(pair) == 2
            and all(isinstance(x, str) for x in pair)
        ):
            raise InvalidInput(f"neutral fact {i} must be a (prompt, answer) pair of strings")
    examples = [
        encode(model, p, a, f"neutral fact {i} ({p!r})") for i, (p, a) in enumerate(neutral)
    ]
    return neutral, examples


def finetune_edit(
    model: HookedModel,
    prepared: Sequence[PreparedRequest],
    hp: FTHparams,
    *,
    neutral_facts: Sequence[Sequence[str]] | None = None,
    fisher: Mapping[str, torch.Tensor] | None = None,
    fisher_cache: str | None = None,
    progress: bool = True,
) -> Edit:
    """Fine-tune the tensors ``hp.params`` of blocks ``hp.layers`` on the prepared requests
    (see :func:`editing.requests.prepared.prepare_requests`) and return the change as an
    :class:`Edit` (method ``"ft-l"``, ``"ft"`` or ``"mixed"`` after ``hp.mode``); the
    model's weights are left bit-identical to what they were.

    Loss: minus the mean over a batch's sequences of the mean log-probability of each target
    token under teacher forcing (``target_new`` for requests, the kept answer for neutral
    facts), plus, with ``hp.constraint == "fisher"``, ``hp.fisher_weight * Σ F (θ − θ0)²``.
    Adam (``hp.lr``, ``hp.weight_decay``) on float32 master copies of the tuned tensors
    (through a float16 model with torch's dynamic loss scaling, :func:`editing.targets.objective.
    loss_scaler`: a step whose scaled gradient overflows is skipped and the scale halved);
    ``hp.num_steps`` passes over the requests in batches of ``hp.batch_size``, one optimiser
    step per batch; with the ``linf`` constraint every tuned number is projected into
    ``θ0 ± hp.norm_constraint`` after every step. Only the tuned tensors get gradients, the
    blocks below the lowest tuned block run once (their output is reused) and the vocabulary
    is projected only at target positions.

    ``neutral_facts`` (mixed mode): (prompt, answer) pairs to keep; default: facts of
    known_1000 the model answers right at top-1, chosen with a fixed seed (at least 16, or
    ``mixed_ratio`` per request). ``fisher``: a precomputed diagonal Fisher by parameter name
    (e.g. of a superset of the tuned tensors); default:
    :func:`editing.statistics.fisher.fisher_diagonal` of the tuned tensors (cached under
    ``fisher_cache`` or the user cache). Bad input (layers, parts, neutral facts, Fisher
    tensors) raises :class:`~tracing.errors.InvalidInput` before
    any change; a non-finite loss raises :class:`~tracing.errors.EditFailed` after the
    weights are restored.
    """
    if not prepared:
        raise InvalidInput("finetune_edit needs at least one prepared request")
    if not hp.layers:
        raise InvalidHparams("fine-tuning needs layers: set hp.layers (or pass layers=[...])")
    layers = [check_layer(model, L) for L in hp.layers]
    requests = [p.request for p in prepared]
    examples = [Example(p.plain.ids + p.target[:-1], len(p.plain.ids), p.target) for p in prepared]
    neutral, neutral_ex = _neutral_examples(model, hp, prepared, neutral_facts)
    schedule = mixed_schedule(
        len(examples),
        len(neutral_ex),
        batch_size=hp.batch_size,
        ratio=hp.mixed_ratio if hp.mode == "mixed" else 0.0,
        num_steps=hp.num_steps,
    )
    tuned, keys = tuned_parameters(model, layers, hp.params)
    names, params = list(tuned), list(tuned.values())
    weights: list[torch.Tensor] = []
    if hp.uses_fisher:
        if fisher is None:
            fisher = fisher_diagonal(
                model, tuned, hp.fisher_settings(), cache_dir=fisher_cache, progress=progress
            )
        missing = [n for n in names if n not in fisher]
        if missing:
            raise InvalidInput(f"the Fisher given has no entry for {missing[0]!r}")
        for n, p in tuned.items():
            f = fisher[n]
            if tuple(f.shape) != tuple(p.shape) or not torch.isfinite(f).all() or (f < 0).any():
                raise InvalidInput(
                    f"the Fisher of {n!r} is not a finite non-negative {tuple(p.shape)}"
                )
            weights.append(f.to(p.device, torch.float32))
    eps = hp.epsilon
    start = layers[0]
    all_ex = examples + neutral_ex
    pad_id = model.tokenizer.pad_token_id
    tokens = pad(all_ex, 0 if pad_id is None else int(pad_id), model_device(model))
    t0 = time.perf_counter()

    snapshot = [p.detach().clone() for p in params]
    before = _snapshot_views(model, keys, params, snapshot)
    try:
        _, block_kwargs = capture_block_kwargs(model, tokens[:1])
        h0 = states_before(model, tokens, start)
        # Adam, the l-infinity projection and the Fisher penalty act on float32 masters
        # whatever the model's dtype (a bfloat16 step of ~1e-4 on weights of ~0.05 would
        # round away). A float32 model's tensors are their own masters and the snapshot is
        # the anchor θ0 (no copies); a half-precision model gets float32 masters, rounded
        # into its tensors before every forward, and anchors read from the snapshot one
        # tensor at a time.
        masters = [
            p if p.dtype == torch.float32 else s.float().requires_grad_(True)
            for p, s in zip(params, snapshot, strict=True)
        ]
        losses: list[float] = []
        penalties: list[float] = []
        with grad_only(model, params):
            opt = torch.optim.Adam(masters, lr=hp.lr, weight_decay=hp.weight_decay)
            # float16: dynamic loss scaling (gradients through a float16 model underflow)
            scaler = loss_scaler(model, masters[0].device)
            bar = tqdm(schedule, desc=f"{METHOD_NAMES[hp.mode]} fine-tuning", disable=not progress)
            for step, batches in enumerate(bar):
                step_loss = step_penalty = 0.0
                for new_idx, neutral_idx in batches:
                    idx = new_idx + [len(examples) + j for j in neutral_idx]
                    opt.zero_grad(set_to_none=True)
                    loss = -mean_logprob(
                        model, h0[idx], [all_ex[i] for i in idx], block_kwargs, start
                    )
                    if not torch.isfinite(loss):
                        raise EditFailed(
                            f"fine-tuning loss became {loss.item()} at step {step}: weights "
                            "restored (lower the learning rate?)"
                        )
                    scaler.scale(loss).backward()
                    for p, m in zip(params, masters, strict=True):
                        g = p.grad
                        if m is p:
                            if g is None:
                                p.grad = torch.zeros_like(p)
                        else:
                            m.grad = torch.zeros_like(m) if g is None else g.float()
                            p.grad = None
                    if weights:
                        scale = scaler.get_scale() if scaler.is_enabled() else None
                        penalty = add_penalty_grads(
                            masters, snapshot, weights, hp.fisher_weight, scale
                        )
                        step_penalty += penalty / len(batches)
                    scaler.step(opt)  # float16: unscaled first; skipped on inf or NaN
                    scaler.update()
                    with torch.no_grad():
                        for p, m, s in zip(params, masters, snapshot, strict=True):
                            if eps:
                                project_linf_(m, s, eps)
                            if m is not p:
                                p.copy_(m.to(p.dtype))
                    step_loss += loss.item() / len(batches)
                losses.append(step_loss)
                penalties.append(step_penalty)
                bar.set_postfix(loss=f"{step_loss:.3f}")
            del opt
        metadata = {
            "losses": losses,
            "mode": hp.mode,
            "layers": layers,
            "params": hp.params,
            "constraint": hp.constraint if hp.mode != "unconstrained" else None,
            "fisher_penalties": penalties if weights else None,
            "tuned": {n: list(p.shape) for n, p in tuned.items()},
            "neutral_facts": [list(p) for p in neutral],
            "seconds": time.perf_counter() - t0,
        }
        return Edit.from_weights(
            model, before, METHOD_NAMES[hp.mode], list(requests), hp.to_dict(), metadata=metadata
        )
    finally:
        restore_targets(model, before)


def edit_finetune(
    model: HookedModel,
    prepared: Sequence[PreparedRequest],
    hp: FTHparams,
    inputs: EditInputs,
) -> Edit:
    """The registered form of :func:`finetune_edit` (default neutral facts and Fisher)."""
    return finetune_edit(model, prepared, hp, progress=inputs.progress)


def _method(name: str, mode: str, summary: str) -> EditMethod:
    # Zhu et al.'s unconstrained and mixed baselines have no bound unless one is given
    unbounded = {} if mode == "constrained" else {"norm_constraint": None}
    return EditMethod(
        name=name,
        hparams=FTHparams,
        edit=edit_finetune,
        batched=False,
        uses_templates=False,
        summary=summary,
        fixed={"mode": mode},
        file_defaults=unbounded,
    )


METHODS = (
    _method(
        "ft-l",
        "constrained",
        "fine-tuning with an l-infinity or Fisher constraint (Zhu et al. 2020)",
    ),
    _method("ft", "unconstrained", "plain fine-tuning of the chosen block tensors"),
    _method("mixed", "mixed", "fine-tuning on batches mixing new and unmodified facts"),
)
