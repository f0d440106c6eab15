"""Text generation for the fluency metric (which prompts, fast seeded generation) and the
metric itself: n-gram entropy of the generated text.

Generation runs the bridge's underlying Hugging Face model (``model.original_model``) one
token at a time with its KV cache and no hooks attached; weight edits made through the bridge
are in that model (they share storage), so the edited model is what generates. Prompts of
different lengths are left-padded into one batch (attention mask and positions from the
mask), and every prompt samples from its own seeded generator, so a prompt's text does not
depend on which other prompts share its batch. The vocabulary projection (the dominant cost
for Gemma's 262k words) is computed only at the last position.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from editing.evaluation.datasets import CounterFactRecord, ZsreRecord
from tracing.chat import prompt_text
from tracing.errors import InvalidInput
from tracing.models import (
    HookedModel,
    model_device,
    tokenize,
)

#: Prompts built from the subject when a record has no generation prompts of its own.
SUBJECT_TEMPLATES = ("{} is", "{} was")


@dataclass(frozen=True)
class GenerationSettings:
    """How fluency text is generated. ROME sampled with top-k 5 to 100 tokens in total."""

    max_new_tokens: int = 40
    sample: bool = True  # top-k sampling (seeded per prompt) or greedy
    top_k: int = 5
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.top_k < 1 or self.batch_size < 1:
            raise InvalidInput("max_new_tokens, top_k and batch_size must be at least 1")


def generation_prompts(record: CounterFactRecord | ZsreRecord) -> tuple[list[str], str]:
    """The prompts to generate from for a case, and where they came from: ``"record"`` (the
    full CounterFact form's generation prompts) or ``"subject"`` (built from the subject with
    :data:`SUBJECT_TEMPLATES`)."""
    own = list(getattr(record, "generation_prompts", ()) or ())
    if own:
        return own, "record"
    return [t.format(record.subject) for t in SUBJECT_TEMPLATES], "subject"


def _next_tokens(
    logits: torch.Tensor, cfg: GenerationSettings, gens: list[torch.Generator]
) -> torch.Tensor:
    if not cfg.sample:
        return logits.argmax(dim=-1)
    vals, idx = logits.float().topk(min(cfg.top_k, logits.shape[-1]), dim=-1)
    # Sampled on the CPU with per-prompt CPU generators: the same seed gives the same
    # text whatever device the model runs on.
    probs = torch.softmax(vals, dim=-1).cpu()
    picks = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)]
    return idx.gather(1, torch.stack(picks).to(idx.device))[:, 0]


def _generate_batch(
    model, seqs: list[list[int]], cfg: GenerationSettings, seeds: list[int], pad: int
) -> list[list[int]]:
    hf = model.original_model
    width = max(map(len, seqs))
    dev = model_device(model)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], dtype=torch.long, device=dev)
    mask = torch.tensor(
        [[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=dev
    )
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    out: list[torch.Tensor] = []
    past = None
    for _ in range(cfg.max_new_tokens):
        res = hf(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=past,
            use_cache=True,
            logits_to_keep=1,
        )
        past = res.past_key_values
        nxt = _next_tokens(res.logits[:, -1], cfg, gens)
        out.append(nxt)
        ids = nxt[:, None]
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        pos = pos[:, -1:] + 1
    return torch.stack(out, dim=1).tolist()


def generate_texts(
    model: HookedModel,
    prompts: Sequence[str],
    settings: GenerationSettings | None = None,
    seeds: Sequence[int] | int = 0,
) -> list[str]:
    """Prompt + generated continuation for each prompt (decoded up to the first EOS, special
    tokens dropped). ``seeds``: one per prompt, or one int from which per-prompt seeds
    ``seed + i`` are made; the same prompt, seed and weights give the same text."""
    cfg = settings or GenerationSettings()
    if not prompts:
        return []
    seed_list = (
        [int(seeds) + i for i in range(len(prompts))]
        if isinstance(seeds, int)
        else [int(s) for s in seeds]
    )
    if len(seed_list) != len(prompts):
        raise InvalidInput(f"{len(seed_list)} seeds for {len(prompts)} prompts")
    tok = model.tokenizer
    eos = tok.eos_token_id
    pad = next((t for t in (tok.pad_token_id, eos) if t is not None), 0)
    seqs = [tokenize(model, prompt_text(model, p)) for p in prompts]  # chat form when on
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # little padding per batch
    gen: dict[int, list[int]] = {}
    with torch.no_grad():
        for start in range(0, len(order), cfg.batch_size):
            chunk = order[start : start + cfg.batch_size]
            rows = _generate_batch(
                model, [seqs[i] for i in chunk], cfg, [seed_list[i] for i in chunk], pad
            )
            gen.update(zip(chunk, rows, strict=True))
    texts = []
    for i, prompt in enumerate(prompts):
        row = gen[i]
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        texts.append(prompt + tok.decode(row, skip_special_tokens=True))
    return texts


# --------------------------------------------------------------------------- fluency

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Word tokens for n-gram statistics: runs of word characters and single punctuation marks
    (close to NLTK's word_tokenize, which ROME used, without the dependency)."""
    return _WORD.findall(text)


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME's generation entropy of one text, in bits: for each n, the entropy of the n-gram
    frequency distribution; result = mean over n of ``weight_n * H_n`` (a text too short for
    any n-gram of some n contributes 0 for it). ROME's tables print this times 100."""
    if len(ns) != len(weights) or not ns:
        raise InvalidInput("ns and weights must be non-empty and of equal length")
    toks = words(text)
    total = 0.0
    for n, w in zip(ns, weights, strict=True):
        counts = Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
        m = sum(counts.values())
        h = -sum(c / m * math.log2(c / m) for c in counts.values()) if m else 0.0
        total += w * h
    return total / len(ns)


def fluency(texts: Sequence[str]) -> float | None:
    """Mean :func:`ngram_entropy` over texts (``None`` for no texts)."""
    values = [ngram_entropy(t) for t in texts]
    return sum(values) / len(values) if values else None
