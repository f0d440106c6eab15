"""Teacher-forced token scores: what every edit metric is computed from.

A :class:`Scorer` is anything with a ``score(pairs)`` method returning, for each
``(prompt, target)`` pair, the log-probability and the top-1 prediction at each target token
under teacher forcing (:class:`TokenScores`). :class:`ModelScorer` computes them on a hooked
model: one pass per distinct ``prompt + target[:-1]`` (a sequence that is a prefix of another
is read from the longer one), right-padded batches, the vocabulary projection only at the
positions a target needs. Tests pass stubs with hand-set probabilities.
:mod:`editing.evaluation.metrics` turns the scores into CounterFact and zsRE metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from tracing.chat import prompt_text
from tracing.errors import InvalidInput
from tracing.forward import capture_states
from tracing.models import (
    HookedModel,
    context_length,
    final_logprobs,
    hook_name,
    model_device,
    n_layers,
    target_ids,
    tokenize,
)

__all__ = ["ModelScorer", "Scorer", "TokenScores", "space_target"]


# --------------------------------------------------------------------------- token scores


@dataclass(frozen=True)
class TokenScores:
    """Teacher-forced scores of one target after one prompt."""

    target: tuple[int, ...]  # target token ids
    logprobs: tuple[float, ...]  # log p(target[i] | prompt, target[:i])
    argmax: tuple[int, ...]  # the model's top-1 token at each of those positions

    @property
    def mean_logprob(self) -> float:
        """Mean per-token log-probability (ROME compares these)."""
        return sum(self.logprobs) / len(self.logprobs)

    @property
    def prob(self) -> float:
        """ROME's P(target | prompt): exp of the mean per-token log-probability."""
        return math.exp(self.mean_logprob)

    @property
    def accuracy(self) -> float:
        """Fraction of target tokens that are the top-1 prediction under teacher forcing."""
        hits = sum(int(a == t) for a, t in zip(self.argmax, self.target, strict=True))
        return hits / len(self.target)

    @property
    def exact(self) -> bool:
        """Every target token is the top-1 prediction under teacher forcing: greedy decoding
        after the prompt produces the target, token for token."""
        return all(a == t for a, t in zip(self.argmax, self.target, strict=True))

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "target": list(self.target),
            "logprobs": list(self.logprobs),
            "argmax": list(self.argmax),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> TokenScores:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(d["target"]), tuple(float(x) for x in d["logprobs"]), tuple(d["argmax"]))


@runtime_checkable
class Scorer(Protocol):
    """Source of teacher-forced scores (a model, or a stub in tests)."""

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[TokenScores]:
        """Scores of each ``(prompt, target)`` pair, in order."""
        ...


def space_target(text: str) -> str:
    """ROME's target convention: exactly one leading space (``"Paris"`` -> ``" Paris"``)."""
    stripped = text.lstrip()
    if not stripped:
        raise InvalidInput(f"empty target {text!r}")
    return f" {stripped}"


class ModelScorer:
    """Teacher-forced scores from a hooked model (TransformerBridge).

    The log-probabilities of ``target`` after ``prompt`` are read from one forward pass of
    ``prompt + target[:-1]`` (the last target token is predicted, never fed). Pairs share
    passes: a sequence that is a prefix of another needed sequence is read from the longer
    one (causal attention: later tokens cannot change earlier positions), so a prompt scored
    against several single-token targets (CounterFact's new and true objects on every
    neighbourhood prompt) runs once. The remaining sequences are sorted by length and
    right-padded into batches of ``batch_size``; the final residual stream is read by a hook,
    where the pass stops, and projected to the vocabulary only at the positions some target
    needs.
    ``sequences_run`` counts the passes made (tests check that sharing happens).
    """

    def __init__(self, model: HookedModel, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise InvalidInput("batch_size must be at least 1")
        self.model = model
        self.batch_size = batch_size
        self.sequences_run = 0
        self._resid = hook_name(model, "resid", n_layers(model) - 1)
        pad = getattr(model.tokenizer, "pad_token_id", None)
        self._pad = int(pad) if pad is not None else 0

    def _encode(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        p_ids = tokenize(self.model, prompt_text(self.model, prompt))  # chat form when on
        t_ids = target_ids(self.model, target)
        limit = context_length(self.model)
        if len(p_ids) + len(t_ids) > limit:
            raise InvalidInput(
                f"prompt {prompt!r} + target {target!r} is {len(p_ids) + len(t_ids)} tokens, "
                f"longer than the context ({limit})"
            )
        return p_ids, t_ids

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[TokenScores]:
        """Scores of each ``(prompt, target)`` pair, in order (duplicates scored once)."""
        unique = list(dict.fromkeys((p, t) for p, t in pairs))
        encoded = [self._encode(p, t) for p, t in unique]
        fed = [tuple(p + t[:-1]) for p, t in encoded]
        carrier = _carriers(fed)
        runs = sorted(set(carrier.values()), key=len)
        reads: dict[tuple[int, ...], set[tuple[int, int]]] = {seq: set() for seq in runs}
        for (p, t), seq in zip(encoded, fed, strict=True):
            reads[carrier[seq]].update(zip(range(len(p) - 1, len(p) + len(t) - 1), t, strict=True))
        lps: dict[tuple[tuple[int, ...], int, int], float] = {}
        tops: dict[tuple[tuple[int, ...], int], int] = {}
        for start in range(0, len(runs), self.batch_size):
            chunk = runs[start : start + self.batch_size]
            got_lp, got_top = self._run_batch(chunk, {seq: sorted(reads[seq]) for seq in chunk})
            lps.update(got_lp)
            tops.update(got_top)
        results = []
        for (p, t), seq in zip(encoded, fed, strict=True):
            host = carrier[seq]
            at = range(len(p) - 1, len(p) + len(t) - 1)
            lp = tuple(lps[(host, pos, tok)] for pos, tok in zip(at, t, strict=True))
            results.append(TokenScores(tuple(t), lp, tuple(tops[(host, pos)] for pos in at)))
        by_pair = dict(zip(unique, results, strict=True))
        return [by_pair[(p, t)] for p, t in pairs]

    def _run_batch(
        self, seqs: list[tuple[int, ...]], reads: Mapping[tuple[int, ...], list[tuple[int, int]]]
    ) -> tuple[
        dict[tuple[tuple[int, ...], int, int], float], dict[tuple[tuple[int, ...], int], int]
    ]:
        """One padded pass over ``seqs``: the log-probability of each ``(position, token)``
        read of each sequence, and the top-1 token at each position read."""
        width = max(map(len, seqs))
        rows_ = [list(s) + [self._pad] * (width - len(s)) for s in seqs]
        toks = torch.tensor(rows_, dtype=torch.long, device=model_device(self.model))
        # the final residual stream; the pass stops there (no projection of a last position)
        final = capture_states(self.model, toks, [self._resid], stop_after=self._resid)
        self.sequences_run += len(seqs)
        at_pos = [(s, pos) for s in seqs for pos in sorted({pos for pos, _ in reads[s]})]
        row_of = {key: r for r, key in enumerate(at_pos)}
        index = {s: b for b, s in enumerate(seqs)}
        with torch.no_grad():
            dev = final[self._resid].device
            b_idx = torch.tensor([index[s] for s, _ in at_pos], device=dev)
            p_idx = torch.tensor([pos for _, pos in at_pos], device=dev)
            picked = final[self._resid][b_idx, p_idx]
            logp = final_logprobs(self.model, picked[None])[0]
            want = [(s, pos, tok) for s in seqs for pos, tok in reads[s]]
            r_idx = torch.tensor([row_of[(s, pos)] for s, pos, _ in want], device=dev)
            t_idx = torch.tensor([tok for _, _, tok in want], device=dev)
            lp = logp[r_idx, t_idx].tolist()
            top = logp.argmax(dim=-1).tolist()
        return dict(zip(want, lp, strict=True)), dict(zip(at_pos, top, strict=True))


def _carriers(seqs: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], tuple[int, ...]]:
    """For each sequence, the longest needed sequence it is a prefix of (itself if none).

    In lexicographic order every extension of ``s`` follows ``s`` directly, so if any
    sequence extends ``s`` its successor does; following successors while they extend the
    current one ends at a sequence no other extends."""
    ordered = sorted(set(seqs))
    host: dict[tuple[int, ...], tuple[int, ...]] = {}
    for i in reversed(range(len(ordered))):
        s = ordered[i]
        nxt = ordered[i + 1] if i + 1 < len(ordered) else None
        host[s] = host[nxt] if nxt is not None and nxt[: len(s)] == s else s
    return host
