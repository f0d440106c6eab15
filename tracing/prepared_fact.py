"""One fact made ready for causal tracing: :func:`prepare_fact` and :class:`PreparedFact`.

Every engine of :mod:`tracing.trace` (the reference engine, the fast one of
:mod:`tracing.engine`, attribution patching of :mod:`tracing.attribution`) starts from the
same prepared fact: the prompt's tokens and subject span, the answer token, the noise drawn
once for the subject's embeddings, the clean run's states and the corrupted runs' block
inputs (and keys/values), and the answer's probability in both; and what the trace measures
(:mod:`tracing.metrics`: the metric's readout, its clean and corrupted values, the
direction) and how the subject is corrupted (:mod:`tracing.corruption`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float

from tracing.corruption import choose_replacement
from tracing.engine import run_corrupted
from tracing.errors import InvalidInput
from tracing.facts import tokenize_fact
from tracing.forward import capture_block_kwargs, capture_states
from tracing.metrics import NEEDS_COMPETITOR, Readout, corrupted_top
from tracing.models import (
    HookedModel,
    context_length,
    decode,
    final_logits,
    hook_name,
    model_device,
    n_layers,
    target_ids,
)
from tracing.noise import NoiseSpec, add_noise, noise_draws
from tracing.results import KINDS


@dataclass
class PreparedFact:
    """Everything the engines share for one prompt: tokens, noise, clean and corrupted runs."""

    ids: torch.Tensor  # [1, pos]
    tokens: list[str]
    span: tuple[int, int]
    answer_id: int
    noise: torch.Tensor  # [samples, span_len, d_model], float64
    block_kwargs: list[dict]
    clean: dict[str, torch.Tensor]  # hook name -> [1, pos, d]
    # [n_layers + 1] block inputs, [samples, pos, d] (only block 0's without corrupted_runs)
    corrupt_resid: list[torch.Tensor]
    corrupt_kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # per block: keys, values
    p_clean: float
    p_corrupted: float
    attribution: Any = None  # tracing.attribution.Attribution, computed on first use
    noise_spec: NoiseSpec | None = None
    seed: int = 1
    corrupt_ids: torch.Tensor | None = None  # [1, pos]: token replacement's corrupted prompt
    replacement: str | None = None
    direction: str = "denoise"
    severed_noise: str = "papers"
    readout: Readout | None = None  # the metric (None: the answer's probability)
    clean_value: float = float("nan")  # the metric in the clean run
    corrupted_value: float = float("nan")  # its mean over the corrupted runs
    runs: dict[str, Any] = field(default_factory=dict)  # tracing.interventions.base_run's
    states: dict[str, torch.Tensor] | None = None  # corrupted MLP/attention outputs, on use
    severed_attribution: dict[tuple[str, int], Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        """How many corrupted runs there are (the first axis of ``noise``): the noise
        samples, or 1 under token replacement."""
        return int(self.noise.shape[0])

    @property
    def clean_input(self) -> torch.Tensor:
        """The clean run's input of block 0, ``[1, pos, d]``."""
        return self.clean[next(n for n in self.clean if n.endswith("blocks.0.hook_resid_pre"))]

    @property
    def metric_readout(self) -> Readout:
        """What the engines read at the last position (:class:`tracing.metrics.Readout`)."""
        return self.readout or Readout("prob", self.answer_id)

    def second_noise(self) -> torch.Tensor:
        """The next noise draw of the same seeded generator (the papers' severed traces score
        their second pass with it: :mod:`tracing.severing`)."""
        if self.noise_spec is None:
            raise InvalidInput("this prepared fact keeps no noise specification")
        S, span, d = self.noise.shape
        return noise_draws(S, span, d, self.noise_spec, self.seed, draw=2)


def prepare_fact(
    model: HookedModel,
    prompt: str,
    subject: str,
    answer: str | None,
    noise: NoiseSpec,
    samples: int,
    seed: int,
    occurrence: int = 0,
    *,
    corrupted_runs: bool = True,
    corruption: str = "noise",
    replacement: str | None = None,
    direction: str = "denoise",
    metric: str = "prob",
    severed_noise: str = "papers",
) -> tuple[PreparedFact, list[str]]:
    """Tokenise, pick the answer token, draw the noise, and make the clean and corrupted runs.

    Returns the prepared fact and notes for the user (e.g. a multi-token answer cut to its
    first token). ``corrupted_runs=False`` (attribution patching alone, which makes its own
    corrupted pass with gradients) skips the corrupted runs through the blocks: then
    ``corrupt_resid`` holds only the noisy block-0 input, ``corrupt_kv`` is None and
    ``p_corrupted`` is NaN until :func:`tracing.attribution.attribute` fills it in.

    ``corruption="replace"`` makes one corrupted run of the prompt with the subject replaced
    (:func:`tracing.corruption.choose_replacement`; ``noise`` is then a zero draw of one row);
    ``metric`` and ``direction`` say what the engines read (:mod:`tracing.metrics`).
    """
    notes: list[str] = []
    fact = tokenize_fact(model, prompt, subject, occurrence)
    if len(fact.ids) > context_length(model):
        raise InvalidInput(
            f"prompt has {len(fact.ids)} tokens, longer than the context ({context_length(model)})"
        )
    ids = torch.tensor([fact.ids], device=model_device(model))
    n = n_layers(model)
    names = {hook_name(model, "resid_pre", 0)}
    for layer in range(n):
        names.update(hook_name(model, k, layer) for k in KINDS)
    final = hook_name(model, "resid", n - 1)
    names.add(final)
    clean, kwargs = capture_block_kwargs(model, ids, lambda nm: nm in names)
    with torch.no_grad():
        logits = final_logits(model, clean[final][:, -1:])
    probs = torch.softmax(logits[0, -1].float(), -1)
    if answer is None:
        answer_id = int(probs.argmax())
    else:
        answer_tokens = target_ids(model, answer)
        answer_id = answer_tokens[0]
        if len(answer_tokens) > 1:
            notes.append(
                f"answer {answer!r} is {len(answer_tokens)} tokens; traced its first token "
                f"{decode(model, answer_id)!r}"
            )
    d_model = int(model.cfg.d_model)
    span_len = fact.subject_span[1] - fact.subject_span[0]
    block0 = hook_name(model, "resid_pre", 0)
    corrupt_ids, competitor = None, None
    if corruption == "replace":
        rep = choose_replacement(
            model, fact, prompt, subject, answer_id, seed, occurrence, replacement
        )
        notes += [rep.note] if rep.note else []
        notes.append(f"subject replaced by {rep.subject!r}")
        replacement, competitor = rep.subject, rep.competitor_id
        corrupt_ids = torch.tensor([rep.ids], device=ids.device)
        draws = torch.zeros(1, span_len, d_model, dtype=torch.float64)
        h = capture_states(model, corrupt_ids, [block0], stop_after=block0)[block0]
    else:
        draws = noise_draws(samples, span_len, d_model, noise, seed)
        h = add_noise(clean[block0], draws, fact.subject_span)
    corrupt: list[torch.Tensor] = [h]
    corrupt_kv, p_corrupted = None, float("nan")
    readout = Readout(metric, answer_id)
    clean_value = float(probs[answer_id])
    corrupted_value = float("nan")
    if corrupted_runs:
        corrupt, corrupt_kv = run_corrupted(model, h, kwargs)
        with torch.no_grad():
            p_corrupted = answer_probs(model, corrupt[-1], answer_id).mean().item()
            if metric != "prob":
                last = final_logits(model, corrupt[-1][:, -1:])[:, 0].float()
                if metric in NEEDS_COMPETITOR:
                    competitor = competitor if competitor is not None else corrupted_top(last)
                    if competitor == answer_id:
                        raise InvalidInput(
                            f"metric {metric!r} needs a competitor, and the corrupted run's top "
                            f"token is the answer {decode(model, answer_id)!r} itself: there is "
                            "no competitor (use --metric prob or logprob)"
                        )
                readout = Readout(metric, answer_id, competitor)
                clean_value = float(readout(logits[:, -1].float())[0])
                corrupted_value = readout(last).mean().item()
        if metric == "prob":
            corrupted_value = float(p_corrupted)
    prepared = PreparedFact(
        ids=ids,
        tokens=list(fact.tokens),
        span=fact.subject_span,
        answer_id=answer_id,
        noise=draws,
        block_kwargs=kwargs,
        clean=clean,
        corrupt_resid=corrupt,
        corrupt_kv=corrupt_kv,
        p_clean=float(probs[answer_id]),
        p_corrupted=float(p_corrupted),
        noise_spec=noise,
        seed=seed,
        corrupt_ids=corrupt_ids,
        replacement=replacement,
        direction=direction,
        severed_noise=severed_noise,
        readout=readout,
        clean_value=clean_value,
        corrupted_value=corrupted_value,
    )
    return prepared, notes


def metric_values(
    model: HookedModel, prep: PreparedFact, resid: Float[torch.Tensor, "rows pos d"]
) -> Float[torch.Tensor, " rows"]:
    """The metric after the last position of each row of a final residual stream."""
    logits = final_logits(model, resid[:, -1:])[:, 0].float()
    return prep.metric_readout(logits)


def answer_probs(
    model: HookedModel, resid: Float[torch.Tensor, "rows pos d"], answer_id: int
) -> Float[torch.Tensor, " rows"]:
    """The answer's probability after the last position of each row of a final residual
    stream (the one definition of ``p_corrupted``, whichever pass made the stream)."""
    logits = final_logits(model, resid[:, -1:])[:, 0].float()
    return torch.softmax(logits, -1)[:, answer_id]
