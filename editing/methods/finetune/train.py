"""Fine-tuning baselines for fact editing (Zhu et al. 2020, "Modifying Memories in Transformer
Models"): constrained fine-tuning (FT-L), plain fine-tuning (FT) and mixed batches.

:func:`finetune_edit` fine-tunes the MLP down-projection weights of the chosen layers (the MLP
weights ROME's FT baselines tune; :func:`tracing.models.down_proj`) to maximise the
teacher-forced log-probability of each request's ``target_new`` after its prompt, with Adam.
The three modes of the paper:

* ``"constrained"`` (FT-L): after every optimiser step each weight is clamped back into
  ``W0 ± epsilon`` (an l-infinity ball around the original weights, ``hp.norm_constraint``);
* ``"unconstrained"`` (FT): no clamp (``norm_constraint`` is ignored);
* ``"mixed"``: every batch of new facts also holds ``hp.mixed_ratio`` unmodified facts per new
  fact (prompts with the answers the model already gives), so the model is trained to keep
  them; the clamp also applies when ``hp.norm_constraint`` is set.

The model's weights are left exactly as they were: the result is an
:class:`editing.edit.Edit` holding the dense weight change of every tuned layer (apply it
yourself). Only down-projections are tuned, the form ROME's papers call FT-L.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import no_type_check

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from editing.edit import Edit
from editing.hparams import Hparams, check_int, check_layers, check_number
from editing.methods.registry import EditInputs, EditMethod
from editing.prepared import PreparedRequest
from editing.weights import restoring_weights
from tracing.errors import EditFailed, InvalidHparams, InvalidInput
from tracing.facts import known_facts, load_known_facts
from tracing.forward import capture_block_kwargs, capture_states, run_blocks
from tracing.models import (
    HookedModel,
    check_layer,
    context_length,
    down_proj,
    final_logits,
    hook_name,
    model_device,
    target_ids,
    tokenize,
)

log = logging.getLogger(__name__)

MODES = ("constrained", "unconstrained", "mixed")
METHOD_NAMES = {"constrained": "ft-l", "unconstrained": "ft", "mixed": "mixed"}
NEUTRAL_SEED = 0


# Checked by its own __post_init__ (messages name the field), not by run-time type hooks.
@no_type_check
@dataclass
class FTHparams(Hparams):
    """Fine-tuning of the down-projections of ``layers`` (Zhu et al. 2020).

    ``mode``: ``constrained`` (FT-L: after every step each weight is clamped to within
    ``norm_constraint`` (epsilon, l-infinity) of its original value), ``unconstrained``, or
    ``mixed`` (batches mix new facts with ``mixed_ratio`` unmodified facts per new fact). A
    ``norm_constraint`` that is not None bounds the change in every mode.
    """

    family = "ft"

    layers: list[int] | None = None  # type: ignore[assignment]
    lr: float = 5e-4
    num_steps: int = 25
    norm_constraint: float | None = 5e-4
    mode: str = "constrained"
    batch_size: int = 8
    mixed_ratio: float = 1.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        self.layers = check_layers("layers", self.layers)
        check_number("lr", self.lr)
        check_int("num_steps", self.num_steps, minimum=1)
        if self.norm_constraint is not None:
            check_number("norm_constraint", self.norm_constraint)
        if self.mode not in MODES:
            raise InvalidHparams(f"unknown FT mode {self.mode!r}; expected one of {MODES}")
        if self.mode == "constrained" and self.norm_constraint is None:
            raise InvalidHparams("constrained fine-tuning (FT-L) needs a norm_constraint (epsilon)")
        check_int("batch_size", self.batch_size, minimum=1)
        check_number("mixed_ratio", self.mixed_ratio, allow_zero=True)
        check_number("weight_decay", self.weight_decay, allow_zero=True)


@dataclass(frozen=True)
class _Example:
    """One teacher-forced training sequence: prompt tokens then all but the last target token;
    the target's tokens are predicted at positions ``n_prompt - 1 ...``."""

    inputs: tuple[int, ...]
    n_prompt: int
    target: tuple[int, ...]


def _encode(model: HookedModel, prompt: str, target: str, what: str) -> _Example:
    try:
        prompt_ids, tgt = tokenize(model, prompt), target_ids(model, target)
    except InvalidInput as err:
        raise InvalidInput(f"{what}: {err}") from err
    inputs = (*prompt_ids, *tgt[:-1])
    if len(inputs) > context_length(model):
        raise InvalidInput(f"{what}: prompt + target ({len(inputs)} tokens) exceed the context")
    return _Example(tuple(inputs), len(prompt_ids), tuple(tgt))


def default_neutral_facts(
    model: HookedModel,
    n: int,
    *,
    exclude_subjects: Sequence[str] = (),
    seed: int = NEUTRAL_SEED,
    scan_chunk: int = 64,
) -> list[tuple[str, str]]:
    """Up to ``n`` (prompt, answer) pairs from the shipped known facts that ``model`` gets
    right (:func:`tracing.facts.known_facts`), in a seeded random order, skipping facts about
    ``exclude_subjects``. May return fewer than ``n`` (none for a model that knows nothing,
    e.g. a random one)."""
    excluded = set(exclude_subjects)
    facts = [f for f in load_known_facts() if f.answer and f.subject not in excluded]
    random.Random(seed).shuffle(facts)
    found: list[tuple[str, str]] = []
    for start in range(0, len(facts), scan_chunk):
        for f in known_facts(model, facts[start : start + scan_chunk]):
            found.append((f.prompt, str(f.answer)))
            if len(found) >= n:
                return found
    return found


def mixed_schedule(
    n_new: int,
    n_neutral: int,
    *,
    batch_size: int,
    ratio: float,
    num_steps: int,
    seed: int = NEUTRAL_SEED,
) -> list[list[tuple[list[int], list[int]]]]:
    """The batches of a run: per step (one pass over the new facts), a list of
    (new-fact indices, neutral-fact indices). New facts come in order, ``batch_size`` at a
    time; each batch gets ``round(ratio * len(new))`` (at least 1 when ``ratio > 0``) neutral
    facts drawn from successive seeded permutations of all neutral facts, so every neutral
    fact is used equally often. Deterministic for a given seed."""
    if ratio > 0 and n_neutral < 1:
        raise InvalidInput("mixed batches need at least one neutral fact")
    gen = random.Random(seed)
    stream: list[int] = []
    schedule = []
    for _ in range(num_steps):
        step = []
        for start in range(0, n_new, batch_size):
            new = list(range(start, min(start + batch_size, n_new)))
            k = max(1, round(ratio * len(new))) if ratio > 0 else 0
            while len(stream) < k:
                perm = list(range(n_neutral))
                gen.shuffle(perm)
                stream.extend(perm)
            step.append((new, stream[:k]))
            stream = stream[k:]
        schedule.append(step)
    return schedule


def _pad(examples: Sequence[_Example], pad_id: int, device: torch.device) -> torch.Tensor:
    width = max(len(e.inputs) for e in examples)
    rows = [list(e.inputs) + [pad_id] * (width - len(e.inputs)) for e in examples]
    return torch.tensor(rows, dtype=torch.long, device=device)


def _states_before(
    model: HookedModel, tokens: torch.Tensor, layer: int, chunk: int = 32
) -> Float[torch.Tensor, "batch pos d_model"]:
    """The residual stream entering block ``layer`` for every row of ``tokens`` (no gradient;
    each forward stops there)."""
    name = hook_name(model, "resid_pre", layer)
    parts = [
        capture_states(model, tokens[i : i + chunk], [name], name)[name]
        for i in range(0, tokens.shape[0], chunk)
    ]
    return torch.cat(parts)


def _mean_logprob(
    model: HookedModel,
    h0: Float[torch.Tensor, "batch pos d_model"],
    examples: Sequence[_Example],
    block_kwargs: list[dict],
    start: int,
) -> torch.Tensor:
    """Mean over examples of each example's mean target-token log-probability, running only
    blocks ``start..`` from the given residual states and projecting to the vocabulary only at
    the target positions."""
    out = run_blocks(model, h0, block_kwargs, start)
    rows, cols, tgts, weights = [], [], [], []
    for b, e in enumerate(examples):
        for j, t in enumerate(e.target):
            rows.append(b)
            cols.append(e.n_prompt - 1 + j)
            tgts.append(t)
            weights.append(1.0 / (len(e.target) * len(examples)))
    at = out.device
    picked = out[torch.tensor(rows, device=at), torch.tensor(cols, device=at)].unsqueeze(0)
    logp = torch.log_softmax(final_logits(model, picked)[0].float(), dim=-1)
    token_lp = logp.gather(1, torch.tensor(tgts, device=logp.device).unsqueeze(1))[:, 0]
    return (token_lp * torch.tensor(weights, device=logp.device)).sum()


def _parameter(model: HookedModel, layer: int) -> torch.nn.Parameter:
    """The parameter behind ``down_proj(model, layer)`` (itself, or the Linear weight)."""
    view = down_proj(model, layer)
    param = view if view._base is None else view._base
    if not isinstance(param, torch.nn.Parameter):
        raise InvalidInput(f"layer {layer}: the down-projection is not a plain parameter")
    return param


@contextmanager
def _grad_only(model: HookedModel, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Within the block only ``params`` require gradients; afterwards every flag is restored
    and the gradients of ``params`` are dropped."""
    everything = {id(p): p for p in model.parameters()}
    everything.update({id(p): p for p in model.original_model.parameters()})
    flags = [(p, p.requires_grad) for p in everything.values()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p in params:
            p.grad = None
        for p, flag in flags:
            p.requires_grad_(flag)


def finetune_edit(
    model: HookedModel,
    prepared: Sequence[PreparedRequest],
    hp: FTHparams,
    *,
    neutral_facts: Sequence[Sequence[str]] | None = None,
    progress: bool = True,
) -> Edit:
    """Fine-tune the down-projections of ``hp.layers`` on the prepared requests (see
    :func:`editing.prepared.prepare_requests`) and return the change
    as an :class:`Edit` (method ``"ft-l"``, ``"ft"`` or ``"mixed"`` after ``hp.mode``); the
    model's weights are left bit-identical to what they were.

    Loss: minus the mean over a batch's sequences of the mean log-probability of each target
    token under teacher forcing (``target_new`` for requests, the kept answer for neutral
    facts). Adam (``hp.lr``, ``hp.weight_decay``); ``hp.num_steps`` passes over the requests in
    batches of ``hp.batch_size``, one optimiser step per batch; in modes ``"constrained"`` and
    ``"mixed"`` (when ``hp.norm_constraint`` is set) every weight is clamped into
    ``W0 ± hp.norm_constraint`` after every step. Only the tuned parameters get gradients, the
    blocks below the lowest tuned layer run once (their output is reused) and the vocabulary is
    projected only at target positions.

    ``neutral_facts`` (mixed mode): (prompt, answer) pairs to keep; default: facts of
    known_1000 the model answers right at top-1, chosen with a fixed seed (at least 16, or
    ``mixed_ratio`` per request). Bad input (layers, neutral facts) raises
    :class:`~tracing.errors.InvalidInput` before any change; a non-finite loss raises
    :class:`~tracing.errors.EditFailed` after the weights are restored.
    """
    if not prepared:
        raise InvalidInput("finetune_edit needs at least one prepared request")
    if not hp.layers:
        raise InvalidHparams("fine-tuning needs layers: set hp.layers (or pass layers=[...])")
    layers = [check_layer(model, L) for L in hp.layers]
    requests = [p.request for p in prepared]
    examples = [_Example(p.plain.ids + p.target[:-1], len(p.plain.ids), p.target) for p in prepared]
    neutral: Sequence[Sequence[str]] = []
    if hp.mode == "mixed" and hp.mixed_ratio > 0:
        if neutral_facts is None:
            want = max(16, math.ceil(hp.mixed_ratio * len(requests)))
            neutral = default_neutral_facts(
                model, want, exclude_subjects=[r.subject for r in requests]
            )
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
    neutral_ex = [
        _encode(model, p, a, f"neutral fact {i} ({p!r})") for i, (p, a) in enumerate(neutral)
    ]
    schedule = mixed_schedule(
        len(examples),
        len(neutral_ex),
        batch_size=hp.batch_size,
        ratio=hp.mixed_ratio if hp.mode == "mixed" else 0.0,
        num_steps=hp.num_steps,
    )
    eps = None if hp.mode == "unconstrained" else hp.norm_constraint
    start = layers[0]
    all_ex = examples + neutral_ex
    pad_id = model.tokenizer.pad_token_id
    tokens = _pad(all_ex, 0 if pad_id is None else int(pad_id), model_device(model))
    t0 = time.perf_counter()

    with restoring_weights(model, layers, always=True) as before:
        _, block_kwargs = capture_block_kwargs(model, tokens[:1])
        h0 = _states_before(model, tokens, start)
        params = [_parameter(model, layer) for layer in layers]
        # Adam and the l-infinity projection act on float32 master copies whatever the
        # model's dtype (a bfloat16 step of ~1e-4 on weights of ~0.05 would round away);
        # the model's weights receive them, rounded once, before every forward.
        masters = [p.detach().float().clone().requires_grad_(True) for p in params]
        lo_hi = [(m.detach() - eps, m.detach() + eps) for m in masters] if eps else []
        losses: list[float] = []
        with _grad_only(model, params):
            opt = torch.optim.Adam(masters, lr=hp.lr, weight_decay=hp.weight_decay)
            bar = tqdm(schedule, desc=f"{METHOD_NAMES[hp.mode]} fine-tuning", disable=not progress)
            for step, batches in enumerate(bar):
                step_loss = 0.0
                for new_idx, neutral_idx in batches:
                    idx = new_idx + [len(examples) + j for j in neutral_idx]
                    opt.zero_grad(set_to_none=True)
                    loss = -_mean_logprob(
                        model, h0[idx], [all_ex[i] for i in idx], block_kwargs, start
                    )
                    if not torch.isfinite(loss):
                        raise EditFailed(
                            f"fine-tuning loss became {loss.item()} at step {step}: weights "
                            "restored (lower the learning rate?)"
                        )
                    loss.backward()
                    for p, m in zip(params, masters, strict=True):
                        m.grad, p.grad = p.grad.float(), None  # type: ignore[union-attr]
                    opt.step()
                    with torch.no_grad():
                        for i, (p, m) in enumerate(zip(params, masters, strict=True)):
                            if eps:
                                m.copy_(torch.clamp(m, *lo_hi[i]))
                            p.copy_(m.to(p.dtype))
                    step_loss += loss.item() / len(batches)
                losses.append(step_loss)
                bar.set_postfix(loss=f"{step_loss:.3f}")
            del opt
        metadata = {
            "losses": losses,
            "mode": hp.mode,
            "layers": layers,
            "neutral_facts": [list(p) for p in neutral],
            "seconds": time.perf_counter() - t0,
        }
        return Edit.from_weights(
            model, before, METHOD_NAMES[hp.mode], list(requests), hp.to_dict(), metadata=metadata
        )


def edit_finetune(
    model: HookedModel,
    prepared: Sequence[PreparedRequest],
    hp: FTHparams,
    inputs: EditInputs,
) -> Edit:
    """The registered form of :func:`finetune_edit` (default neutral facts)."""
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
    _method("ft-l", "constrained", "fine-tuning with an l-infinity bound (Zhu et al. 2020)"),
    _method("ft", "unconstrained", "plain fine-tuning of the chosen down-projections"),
    _method("mixed", "mixed", "fine-tuning on batches mixing new and unmodified facts"),
)
