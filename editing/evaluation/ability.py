"""General ability of a (possibly edited) model, beside the per-edit metrics: perplexity on
held-out text and top-1 accuracy on facts no edit touched. The sequential runner measures
both at every checkpoint; a model that collapses under many edits shows it here first.

* :func:`heldout_sequences`: the *last* ``n_tokens`` of WikiText-2's validation split, in
  sequences of ``seq_len``. Second-moment statistics read WikiText-2 from the start of the
  test split (:func:`editing.statistics.stats.corpus_sequences`) and reach the validation split only
  beyond the test split's length, so this text is not what the statistics saw (checked by
  :func:`check_heldout`).
* :func:`perplexity`: ``exp`` of the mean next-token NLL over every predicted position.
* :func:`known_fact_accuracy`: the fraction of known_1000 facts (those the unedited model
  answers, :func:`tracing.facts.known_facts`) whose answer's first token is still the top-1
  prediction, leaving out facts about any edited subject.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from editing.statistics.corpus import wikitext_paragraphs
from tracing.errors import InvalidInput
from tracing.facts import Fact
from tracing.forward import capture_states, last_token_logits
from tracing.models import (
    HookedModel,
    final_logprobs,
    hook_name,
    model_device,
    n_layers,
    prepends_bos,
    target_ids,
)


def _split_tokens(model: HookedModel, split: str) -> list[int]:
    ids: list[int] = []
    for text in wikitext_paragraphs(split):
        ids.extend(model.tokenizer(text + "\n", add_special_tokens=False)["input_ids"])
    return ids


def check_heldout(model: HookedModel, stats_tokens: int, corpus: str = "wikitext") -> None:
    """Refuse held-out text that statistics of ``stats_tokens`` tokens of ``corpus`` read."""
    if corpus == "wikitext" and stats_tokens > len(_split_tokens(model, "test")):
        raise InvalidInput(
            f"statistics over {stats_tokens} WikiText tokens reach the validation split, "
            "which perplexity reads: use fewer statistics tokens or another corpus"
        )


def heldout_sequences(
    model: HookedModel, n_tokens: int = 8192, seq_len: int = 128
) -> list[list[int]]:
    """The last ``n_tokens`` tokens of WikiText-2 validation in sequences of ``seq_len``
    (BOS first for models that use one; BOS is never predicted)."""
    if n_tokens < seq_len or seq_len < 2:
        raise InvalidInput(f"need n_tokens >= seq_len >= 2, got {n_tokens}, {seq_len}")
    stream = _split_tokens(model, "valid")[-n_tokens:]
    bos = [model.tokenizer.bos_token_id] if prepends_bos(model) else []
    return [bos + stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def perplexity(
    model: HookedModel, sequences: Sequence[Sequence[int]], batch_size: int = 4
) -> float:
    """``exp`` of the mean NLL of every next token of ``sequences`` (equal lengths, padded
    batches not needed). The vocabulary projection runs 256 positions at a time."""
    resid = hook_name(model, "resid", n_layers(model) - 1)
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        toks = torch.tensor(sequences[start : start + batch_size], device=model_device(model))
        final = capture_states(model, toks, [resid], stop_after=resid)[resid]
        with torch.no_grad():
            h = final[:, :-1].reshape(-1, final.shape[-1])
            nxt = toks[:, 1:].reshape(-1).to(h.device)
            for i in range(0, len(h), 256):
                logp = final_logprobs(model, h[None, i : i + 256])[0]
                total -= float(logp.gather(1, nxt[i : i + 256, None].to(logp.device)).sum())
                count += len(logp)
    return float(torch.tensor(total / count).exp())


def known_fact_accuracy(
    model: HookedModel, facts: Sequence[Fact], exclude_subjects: Iterable[str] = ()
) -> tuple[float, int]:
    """Fraction of ``facts`` (with answers) whose answer's first token is the model's top-1
    next token, over the facts whose subject is not in ``exclude_subjects``; and how many
    facts that is."""
    skip = {s.strip().lower() for s in exclude_subjects}
    kept = [f for f in facts if f.answer and f.subject.strip().lower() not in skip]
    if not kept:
        raise InvalidInput("no facts left to measure accuracy on")
    top: list[int] = []
    for i in range(0, len(kept), 128):  # [128, vocab] logits at a time
        chunk = [f.prompt for f in kept[i : i + 128]]
        top += last_token_logits(model, chunk).argmax(-1).tolist()
    hits = sum(target_ids(model, str(f.answer))[0] == t for f, t in zip(kept, top, strict=True))
    return hits / len(kept), len(kept)
