"""The diagonal Fisher information of chosen parameters on text the model already handles,
cached on disk: the weights of Zhu et al.'s (2020) Fisher-information constraint.

Fine-tuning with ``constraint="fisher"`` minimises ``loss + λ Σ_i F_i (θ_i − θ0_i)²``
(:func:`fisher_penalty`); ``F`` is computed here, once per model, weights and parameter set.

Which Fisher. The *true* (model) Fisher of the next-token distribution, not the empirical
one: for a scored position ``t`` of a sequence ``x``,

    F_t = E_{y ~ p_θ(· | x_<t)} [ (∂ log p_θ(y | x_<t) / ∂θ)² ]   (element-wise square)

with the label ``y`` *sampled from the model's own distribution* (``labels="sampled"``, the
default). ``labels="empirical"`` uses the text's own next token instead, the "empirical
Fisher" (cheaper to reason about, but a different matrix: it measures the data's gradients,
not the model's curvature, and vanishes nowhere the model is wrong).

One sample per position, one backward per sequence: with ``g_t`` the score of position ``t``
and labels drawn independently per position, ``E[(Σ_t g_t)²] = Σ_t E[g_t²]`` (scores have
zero mean under the model's own distribution, so cross terms vanish). So ``(Σ_t g_t)² / n``
is an unbiased estimate of the sequence's mean per-position Fisher from one backward pass.
(For ``empirical`` labels this identity does not hold and the estimate is the squared mean
gradient, as EWC implementations commonly compute it.)

Where. Two sources of text the model handles, each averaged over its sequences, and
``F`` is the mean of the two sources' averages (so a few short facts weigh as much as long
WikiText passages):

* ``n_sequences`` WikiText-2 sequences of ``seq_len`` tokens from the start of the test
  split (:func:`editing.statistics.stats.corpus_sequences`, the text second-moment statistics read;
  perplexity evaluation reads the end of the validation split), every position scored;
* ``n_facts`` known_1000 facts the model answers right at top-1
  (:func:`answered_facts`, seeded), prompt then answer teacher-forced, the answer's positions
  scored. Facts about edited subjects are not removed: ``F`` is computed once per model and
  parameter set, whatever is edited later.

Cache. ``<cache_dir>/fisher/<fingerprint>/<key>/`` where ``key`` hashes the weights
(:func:`editing.edits.weights.weights_key` plus a digest of the chosen tensors themselves), the
parameter names and shapes, and the settings. Partial sums are checkpointed, so an
interrupted run resumes; a cache whose recorded model, weights or parameter set differ from
the request is refused with a logged warning and recomputed. A finished cache made for a
*superset* of the asked tensors, with the same model, weights and settings, serves the subset:
a tensor's diagonal Fisher does not depend on which other tensors were estimated with it (the
labels are sampled from the model's output, the squared gradients are per number), so the
study's every-block Fisher gives any one block's at no cost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from editing.edits.weights import weights_key
from editing.params import grad_only, parse_name
from editing.statistics.stats import corpus_sequences
from editing.statistics.tensor_file import write_safetensors
from tracing.errors import InvalidInput
from tracing.facts import known_facts, load_known_facts
from tracing.forward import capture_block_kwargs, run_blocks
from tracing.io import atomic_path, write_json_atomic
from tracing.loading import cache_dir as user_cache_dir
from tracing.models import (
    HookedModel,
    final_logprobs,
    fingerprint,
    hook_name,
    model_device,
    target_ids,
    tokenize,
)

log = logging.getLogger(__name__)

LABELS = ("sampled", "empirical")
#: Seed of the known facts the Fisher reads (fine-tuning's mixed batches use seed 0).
FACTS_SEED = 1


@dataclass(frozen=True)
class FisherSettings:
    """What the Fisher is estimated on (see the module docstring)."""

    n_sequences: int = 32
    seq_len: int = 128
    n_facts: int = 64
    labels: str = "sampled"
    seed: int = 0
    corpus: str = "wikitext"

    def __post_init__(self) -> None:
        for name in ("n_sequences", "n_facts", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(f"Fisher {name} must be an integer >= 0, got {value!r}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise InvalidInput(f"Fisher seq_len must be an integer >= 2, got {self.seq_len!r}")
        if self.labels not in LABELS:
            raise InvalidInput(f"Fisher labels must be one of {LABELS}, got {self.labels!r}")
        if self.n_sequences == 0 and self.n_facts == 0:
            raise InvalidInput(
                "the Fisher constraint needs unmodified text: n_sequences and n_facts are both 0"
            )


@dataclass(frozen=True)
class ScoredText:
    """One sequence of the estimate: its tokens, the positions whose next token is scored,
    the text's own next tokens there (the empirical labels), and its source."""

    tokens: tuple[int, ...]
    positions: tuple[int, ...]
    observed: tuple[int, ...]
    source: str  # "wikitext" or "facts"


def answered_facts(
    model: HookedModel,
    n: int,
    *,
    exclude_subjects: Sequence[str] = (),
    seed: int = FACTS_SEED,
    scan_chunk: int = 64,
) -> list[tuple[str, str]]:
    """Up to ``n`` (prompt, answer) pairs from the shipped known facts that ``model`` gets
    right at top-1 (:func:`tracing.facts.known_facts`), in a seeded random order, skipping
    facts about ``exclude_subjects``. May return fewer (none for a model that knows nothing,
    e.g. a random one); scans only as far as needed."""
    excluded = set(exclude_subjects)
    facts = [f for f in load_known_facts() if f.answer and f.subject not in excluded]
    random.Random(seed).shuffle(facts)
    found: list[tuple[str, str]] = []
    for start in range(0, len(facts), scan_chunk):
        if len(found) >= n:
            break
        for f in known_facts(model, facts[start : start + scan_chunk]):
            found.append((f.prompt, str(f.answer)))
    return found[:n]


def fisher_texts(model: HookedModel, settings: FisherSettings) -> list[ScoredText]:
    """The sequences the estimate reads, WikiText first, then facts (see the module
    docstring). Raises :class:`~tracing.errors.InvalidInput` when there are none."""
    out = []
    if settings.n_sequences:
        n_tokens = settings.n_sequences * settings.seq_len
        for seq in corpus_sequences(model, settings.corpus, n_tokens, settings.seq_len):
            out.append(
                ScoredText(tuple(seq), tuple(range(len(seq) - 1)), tuple(seq[1:]), "wikitext")
            )
    if settings.n_facts:
        for prompt, answer in answered_facts(model, settings.n_facts):
            ids, tgt = tokenize(model, prompt), target_ids(model, answer)
            positions = tuple(range(len(ids) - 1, len(ids) - 1 + len(tgt)))
            out.append(ScoredText(tuple(ids + tgt[:-1]), positions, tuple(tgt), "facts"))
    if not out:
        raise InvalidInput(
            "the Fisher constraint needs unmodified text: no WikiText sequences were asked for "
            "and the model answers none of the known facts right (set fisher_sequences > 0)"
        )
    return out


def sampled_labels(logp: Float[torch.Tensor, "pos vocab"], seed: int, index: int) -> torch.Tensor:
    """One label per row drawn from ``exp(logp)`` by inverse-CDF sampling: uniforms from a
    CPU generator seeded with ``(seed, index)`` (the same draws on every device), located in
    the float64 cumulative distribution."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    u = torch.rand(logp.shape[0], 1, generator=gen, dtype=torch.float64)
    cdf = logp.detach().double().exp().cpu().cumsum(-1)
    u = u * cdf[:, -1:]  # the probabilities sum to 1 up to rounding
    labels = torch.searchsorted(cdf, u).clamp_(max=logp.shape[1] - 1)
    return labels[:, 0].to(logp.device)


def _sequence_grads(
    model: HookedModel,
    text: ScoredText,
    params: Sequence[torch.Tensor],
    start: int,
    settings: FisherSettings,
    index: int,
) -> list[torch.Tensor]:
    """Gradient of the sequence's summed log-likelihood of its labels w.r.t. ``params``."""
    tokens = torch.tensor([text.tokens], device=model_device(model))
    cache, kwargs = capture_block_kwargs(model, tokens)
    h0 = cache[hook_name(model, "resid_pre", start)]
    out = run_blocks(model, h0, kwargs, start)
    pos = torch.tensor(text.positions, device=out.device)
    logp = final_logprobs(model, out[:, pos])[0]
    if settings.labels == "sampled":
        labels = sampled_labels(logp, settings.seed, index)
    else:
        labels = torch.tensor(text.observed, device=logp.device)
    total = logp.gather(1, labels[:, None]).sum()
    return list(torch.autograd.grad(total, list(params)))


def _digest(params: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, p in params.items():
        h.update(name.encode())
        h.update(p.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_record(
    model: HookedModel, params: Mapping[str, torch.Tensor], settings: FisherSettings
) -> dict:
    """What a Fisher cache records about what it was made for: model fingerprint, weights,
    parameter names and shapes, settings. A cache is used only when this matches exactly."""
    return {
        "model_fingerprint": fingerprint(model),
        "weights_key": weights_key(model),
        "values_digest": _digest(params),
        "parameters": {n: list(p.shape) for n, p in params.items()},
        "settings": asdict(settings),
    }


def cache_folder(
    model: HookedModel,
    params: Mapping[str, torch.Tensor],
    settings: FisherSettings,
    cache_dir: str | Path | None = None,
) -> Path:
    """The cache folder of this model, weights, parameter set and settings."""
    root = Path(cache_dir) if cache_dir is not None else user_cache_dir() / "fisher"
    blob = json.dumps(cache_record(model, params, settings), sort_keys=True).encode()
    return root / fingerprint(model) / hashlib.sha256(blob).hexdigest()[:16]


def _read_cached(stem: Path, record: dict) -> tuple[dict, dict[str, torch.Tensor]] | None:
    meta_path, data_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not (meta_path.is_file() and data_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        log.warning("unreadable Fisher cache %s: recomputing", meta_path)
        return None
    made_for = {k: meta.get(k) for k in record}
    if made_for != record:
        differs = sorted(k for k in record if made_for[k] != record[k])
        log.warning(
            "refusing Fisher cache %s: made for another %s; recomputing",
            stem,
            " / ".join(differs),
        )
        return None
    return meta, load_file(str(data_path))


def _from_superset(root: Path, record: dict) -> dict[str, torch.Tensor] | None:
    """The asked tensors' entries of a finished cache under ``root`` made for a superset of
    them with the same model, weights and settings (see the module docstring), or None."""
    want = record["parameters"]
    for meta_path in sorted(root.glob("*/fisher.json")):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        have = meta.get("parameters") or {}
        same = all(
            meta.get(k) == record[k] for k in ("model_fingerprint", "weights_key", "settings")
        )
        data = meta_path.with_suffix(".safetensors")
        if same and data.is_file() and all(have.get(n) == shape for n, shape in want.items()):
            with safe_open(str(data), framework="pt") as f:
                tensors = {n: f.get_tensor(n) for n in want}
            log.info(
                "Fisher of %d tensors read from %s (made for %d)",
                len(want),
                meta_path.parent,
                len(have),
            )
            return tensors
    return None


def _write(stem: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(stem.with_suffix(".safetensors")) as tmp:
        write_safetensors(tmp, tensors)  # streamed: no in-memory copy of the file
    write_json_atomic(stem.with_suffix(".json"), meta)


def fisher_diagonal(
    model: HookedModel,
    params: Mapping[str, torch.Tensor],
    settings: FisherSettings | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    checkpoint_every: int = 8,
) -> dict[str, Float[torch.Tensor, "..."]]:
    """The diagonal Fisher information of ``params`` (``{name: live tensor}``, names from
    :mod:`editing.params`), float32 on each tensor's device, by name (see the module
    docstring for which Fisher and on what text).

    Read from the cache when one was made for exactly this model, weights, parameter set and
    settings; otherwise computed (one forward and one backward per sequence, only from the
    lowest tuned block up, with a progress bar), checkpointed every ``checkpoint_every``
    sequences so an interrupted run resumes, and cached. The model's weights are never
    changed. Bad settings or no text to estimate on raise
    :class:`~tracing.errors.InvalidInput` before any work.
    """
    settings = settings or FisherSettings()
    if not params:
        raise InvalidInput("the Fisher needs at least one parameter")
    start = min(parse_name(n) for n in params)
    record = cache_record(model, params, settings)
    folder = cache_folder(model, params, settings, cache_dir)
    done = _read_cached(folder / "fisher", record)
    if done is not None:
        log.info("Fisher of %d tensors read from %s", len(params), folder)
        return {n: done[1][n].to(p.device) for n, p in params.items()}
    wider = _from_superset(folder.parent, record)
    if wider is not None:
        return {n: wider[n].to(p.device) for n, p in params.items()}
    texts = fisher_texts(model, settings)
    sources = sorted({t.source for t in texts})
    sums = {
        f"{s}/{n}": torch.zeros(p.shape, dtype=torch.float32)
        for s in sources
        for n, p in params.items()
    }
    first = 0
    partial = _read_cached(folder / "partial", record)
    if partial is not None:
        first = int(partial[0]["done"])
        sums = {k: partial[1][k] for k in sums}
        log.info("resuming the Fisher at sequence %d of %d", first, len(texts))
    names, tensors = list(params), list(params.values())
    with grad_only(model, tensors):
        bar = tqdm(
            range(first, len(texts)),
            total=len(texts),
            initial=first,
            desc="Fisher information",
            disable=not progress,
        )
        for i in bar:
            grads = _sequence_grads(model, texts[i], tensors, start, settings, i)
            n = len(texts[i].positions)
            for name, g in zip(names, grads, strict=True):
                sums[f"{texts[i].source}/{name}"] += (g.detach().float() ** 2 / n).cpu()
            if (i + 1) % checkpoint_every == 0 and i + 1 < len(texts):
                _write(folder / "partial", sums, {**record, "done": i + 1})
    counts = {s: sum(t.source == s for t in texts) for s in sources}
    # the mean over sources of each source's mean, formed in the sums' own memory:
    # ((0 + s_1 / c_1) + s_2 / c_2 + ...) / len(sources), the same float32 operations as the
    # out-of-place sum (0 + x = x exactly), without a block-sized temporary per operation
    fisher: dict[str, torch.Tensor] = {}
    for name in names:
        parts = [sums.pop(f"{s}/{name}").div_(counts[s]) for s in sources]
        total = parts[0]
        for part in parts[1:]:
            total.add_(part)
        del parts
        fisher[name] = total.div_(len(sources))
    if not all(torch.isfinite(f).all() for f in fisher.values()):
        raise InvalidInput("the Fisher information came out NaN or inf (model weights?)")
    _write(folder / "fisher", fisher, {**record, "counts": counts})
    for stem in ("partial.json", "partial.safetensors"):
        (folder / stem).unlink(missing_ok=True)
    return {n: fisher[n].to(p.device) for n, p in params.items()}


def fisher_penalty(
    values: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    fisher: Sequence[torch.Tensor],
    weight: float,
) -> torch.Tensor:
    """``weight * Σ_i F_i (θ_i − θ0_i)²`` summed over every tensor (float32 or wider): the
    quadratic Fisher constraint. Its gradient w.r.t. ``θ`` is ``2 * weight * F * (θ − θ0)``."""
    total = torch.zeros((), dtype=torch.float32, device=values[0].device)
    for v, a, f in zip(values, anchors, fisher, strict=True):
        total = total + (f * (v - a) ** 2).sum()
    return weight * total
