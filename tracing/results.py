"""Result values of causal tracing: plain dataclasses that save to and load from JSON.

``viz`` renders these; nothing here runs a model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tracing.io import write_json_atomic

#: The kinds of state a trace restores (hook kinds of :mod:`tracing.models`).
TraceKind = Literal["resid", "mlp", "attn"]
KINDS: tuple[TraceKind, ...] = ("resid", "mlp", "attn")
#: Severed-path kinds (Meng et al. 2022, Fig. 3c; :mod:`tracing.severing`): the hidden state
#: restored while the MLP (resp. attention) outputs at its token stay at their corrupted values.
SEVERED_KINDS: tuple[str, ...] = ("resid/mlp-severed", "resid/attn-severed")
#: Every kind a trace can hold, in the order results list them.
ALL_KINDS: tuple[str, ...] = (*KINDS, *SEVERED_KINDS)
#: Settings a stored trace must share with a resumed run (they change what a score *is*, so a
#: folder never mixes them: :meth:`TraceSettings.conflict`).
DEFINING_SETTINGS = ("corruption", "replacement", "direction", "metric", "normalise")
#: Which token rows a trace measures (:func:`tracing.trace.trace_fact`'s ``tokens``): every
#: token, or only the subject's last token (one row per kind; the other rows are NaN).
TOKEN_SETS = ("all", "subject-last")
TOKEN_CLASSES = (
    "first_subject",
    "middle_subject",
    "last_subject",
    "first_subsequent",
    "further",
    "last",
)


@dataclass
class TraceSettings:
    """Every setting a trace was computed with (enough to reproduce it)."""

    kinds: tuple[str, ...]
    window: dict[str, int]
    noise: float  # the standard deviation actually added (after any sigma multiple)
    noise_spec: str  # what the user asked for, e.g. "3s" or "0.5" or "u3s"
    sigma: float | None  # std of subject embeddings when noise_spec is a multiple of it
    uniform_noise: bool
    samples: int
    seed: int
    method: str  # "fast" or "reference" (exact engines), "atp" or "atp+exact" (estimates)
    model: str = ""
    model_fingerprint: str = ""
    exact_top: float | None = None  # atp+exact: share of each kind's cells recomputed exactly
    atp_space: str | None = None  # atp, atp+exact: "logodds" or "prob" (tracing.attribution)
    corruption: str = "noise"  # "noise" (Gaussian noise on the subject) or "replace" (STR)
    replacement: str | None = None  # replace: the subject put in the subject's place
    direction: str = "denoise"  # "denoise": clean states into the corrupted run; "noise": reverse
    metric: str = "prob"  # "prob", "logprob" or "logit-diff" (tracing.metrics)
    normalise: bool = False  # scores as (m - m_corrupted) / (m_clean - m_corrupted)
    severed_noise: str | None = None  # severed kinds: "papers" or "same" (tracing.severing)
    tokens: str = "all"  # "all" token rows, or "subject-last" only (TOKEN_SETS)

    def conflict(self, wanted: TraceSettings) -> str | None:
        """The first of :data:`DEFINING_SETTINGS` in which these settings differ from
        ``wanted``, as ``"metric 'prob' (asked: 'logprob')"``; None when they agree. A
        replacement subject is compared only when ``wanted`` names one (else each fact's is
        drawn: :mod:`tracing.corruption`)."""
        for name in DEFINING_SETTINGS:
            have, ask = getattr(self, name), getattr(wanted, name)
            if name == "replacement" and ask is None:
                continue
            if have != ask:
                return f"{name} {have!r} (asked: {ask!r})"
        return None

    def covers(self, wanted: TraceSettings) -> bool:
        """Whether a trace made with these settings has every score a trace with ``wanted``
        would have: the same model, noise (level and kind), samples, seed and method (and
        ``atp+exact`` share), every wanted kind, with the same window, and every wanted token
        row (a trace of all tokens covers one of the last subject token, not the reverse).
        An estimate never stands in for an exact trace, nor one method for another."""
        same = (
            self.model_fingerprint == wanted.model_fingerprint
            and self.noise == wanted.noise
            and self.uniform_noise == wanted.uniform_noise
            and self.samples == wanted.samples
            and self.seed == wanted.seed
            and self.method == wanted.method
            and self.exact_top == wanted.exact_top
            and self.atp_space == wanted.atp_space
            and self.conflict(wanted) is None
            and (self.severed_noise == wanted.severed_noise or not _severed(wanted.kinds))
            and (self.tokens == "all" or self.tokens == wanted.tokens)
        )
        return same and all(
            k in self.kinds and self.window.get(k) == wanted.window.get(k) for k in wanted.kinds
        )


def _severed(kinds: tuple[str, ...]) -> bool:
    return any(k in SEVERED_KINDS for k in kinds)


@dataclass
class TraceResult:
    """A causal trace of one fact.

    ``scores[kind]`` is a ``[tokens, layers]`` array: the mean probability of ``answer`` over the
    noisy runs when that state (for ``mlp``/``attn``: a window of layers centred there) is
    restored from the clean run. ``p_clean`` and ``p_corrupted`` bound it.

    ``exact[kind]`` (a boolean ``[tokens, layers]`` array) says which cells were measured by
    restoring the state; the others are attribution-patching estimates (methods ``atp`` and
    ``atp+exact``, :mod:`tracing.attribution`). ``None``: every cell is exact.

    With other settings (``settings.metric``, ``.direction``, ``.normalise``: see
    :mod:`tracing.metrics`) the scores are in the metric's units: ``clean_value`` and
    ``corrupted_value`` are the metric of the clean and the corrupted run in those units
    (``None``: the probabilities ``p_clean`` and ``p_corrupted``, the default metric).
    ``competitor`` is the token a ``logit-diff`` is taken against.

    A trace of ``settings.tokens == "subject-last"`` measures only the subject's last token:
    every other row of ``scores`` is NaN (:meth:`measured_tokens` lists the measured rows).
    """

    prompt: str
    subject: str
    answer: str
    answer_id: int
    tokens: list[str]
    token_ids: list[int]
    subject_span: tuple[int, int]
    p_clean: float
    p_corrupted: float
    scores: dict[str, np.ndarray]
    settings: TraceSettings
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    exact: dict[str, np.ndarray] | None = None
    clean_value: float | None = None
    corrupted_value: float | None = None
    competitor: str | None = None
    competitor_id: int | None = None

    @property
    def n_layers(self) -> int:
        """The model's layer count: the width of every score map."""
        return int(next(iter(self.scores.values())).shape[1])

    def measured_tokens(self) -> list[int]:
        """Token indices whose rows hold scores: every token, or only the subject's last
        (``settings.tokens == "subject-last"``)."""
        if getattr(self.settings, "tokens", "all") == "subject-last":
            return [self.subject_span[1] - 1]
        return list(range(len(self.tokens)))

    @property
    def clean_score(self) -> float:
        """The clean run's value in the units of ``scores`` (``p_clean`` by default)."""
        return self.p_clean if self.clean_value is None else self.clean_value

    @property
    def corrupted_score(self) -> float:
        """The corrupted run's value in the units of ``scores`` (``p_corrupted`` by default)."""
        return self.p_corrupted if self.corrupted_value is None else self.corrupted_value

    def indirect_effect(self, kind: str) -> np.ndarray:
        """The effect of each state, positive where the state carries the answer:
        ``scores[kind] - p_corrupted`` (the rise in the answer's probability when it is
        restored) by default; under ``direction="noise"`` the loss ``clean - scores[kind]``
        (how much corrupting that state alone takes away). In the metric's units."""
        if getattr(self.settings, "direction", "denoise") == "noise":
            return self.clean_score - self.scores[kind]
        return self.scores[kind] - self.corrupted_score

    def peak(self, kind: str) -> tuple[int, int, float]:
        """(token index, layer, score) of the strongest restoration of ``kind`` (under
        ``direction="noise"``: of the state whose corruption costs the most)."""
        s = self.scores[kind]
        noising = getattr(self.settings, "direction", "denoise") == "noise"
        flat = -s if noising else s  # unmeasured rows (NaN) never peak
        t, layer = np.unravel_index(int(np.nanargmax(flat)), s.shape)
        return int(t), int(layer), float(s[t, layer])

    @property
    def approximate(self) -> bool:
        """Whether any cell is an estimate rather than a measured restoration."""
        return self.exact is not None and not all(np.all(m) for m in self.exact.values())

    def exact_mask(self, kind: str) -> np.ndarray:
        """Boolean ``[tokens, layers]``: which cells of ``kind`` are measured exactly."""
        shape = np.shape(self.scores[kind])
        if self.exact is None:
            return np.ones(shape, dtype=bool)
        return np.asarray(self.exact[kind], dtype=bool)

    def exactness_caption(self) -> str:
        """One line for figures: empty for an exact trace, else e.g. ``"atp+exact: 150 of
        594 cells exact, the rest AtP estimates"``."""
        if not self.approximate:
            return ""
        masks = [self.exact_mask(k) for k in self.scores]
        done, total = sum(int(m.sum()) for m in masks), sum(m.size for m in masks)
        return f"{self.settings.method}: {done} of {total} cells exact, the rest AtP estimates"

    def token_class(self, index: int) -> str:
        """ROME Fig. 2 class of token ``index`` (see :data:`TOKEN_CLASSES`)."""
        return token_class(index, self.subject_span, len(self.tokens))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: arrays as nested lists (unmeasured cells as NaN, which Python's
        ``json`` writes and reads), every setting kept; :meth:`from_dict` inverts it."""
        d = asdict(self)
        d["scores"] = {k: np.asarray(v).tolist() for k, v in self.scores.items()}
        d["subject_span"] = list(self.subject_span)
        if self.exact is not None:
            d["exact"] = {k: np.asarray(v, dtype=bool).tolist() for k, v in self.exact.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TraceResult:
        """The trace a :meth:`to_dict` dict (or a saved JSON file's content) describes: score
        and exactness maps back to float64 and boolean arrays, settings to
        :class:`TraceSettings` (settings added since the file was written take their
        defaults)."""
        d = dict(d)
        settings = dict(d.pop("settings"))
        settings["kinds"] = tuple(settings["kinds"])
        exact = d.get("exact")
        return cls(
            **{k: v for k, v in d.items() if k not in ("scores", "subject_span", "exact")},
            subject_span=tuple(d["subject_span"]),
            scores={k: np.asarray(v, dtype=np.float64) for k, v in d["scores"].items()},
            settings=TraceSettings(**settings),
            exact=None if exact is None else {k: np.asarray(v, bool) for k, v in exact.items()},
        )

    def save(self, path: str | Path) -> Path:
        """Write as JSON (atomically: a partial file is never left under ``path``)."""
        return write_json_atomic(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: str | Path) -> TraceResult:
        """Read a trace written by :meth:`save` (or ``factscope trace``'s ``trace.json``)."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def token_class(index: int, subject_span: tuple[int, int], n_tokens: int) -> str:
    """ROME Fig. 2 token class of ``index`` in a prompt of ``n_tokens`` tokens.

    A one-token subject counts as ``last_subject`` (as in the paper); the prompt's last token
    is ``last`` even when it directly follows the subject; tokens before the subject (a BOS, a
    leading "The") have no class (``"before"``).
    """
    start, end = subject_span
    if index == n_tokens - 1:
        return "last"
    if index < start:
        return "before"
    if index == end - 1:
        return "last_subject"
    if index == start:
        return "first_subject"
    if index < end:
        return "middle_subject"
    if index == end:
        return "first_subsequent"
    return "further"


@dataclass
class AverageEffects:
    """Average indirect effect per layer, per kind and ROME Fig. 2 token class, over facts.

    ``effects[kind][token_class]`` is a ``[layers]`` array of mean ``p_restored - p_corrupted``
    (``counts[kind][token_class]`` facts contributed); ``p_clean`` / ``p_corrupted`` are means.
    """

    effects: dict[str, dict[str, np.ndarray]]
    counts: dict[str, dict[str, int]]
    n_facts: int
    mean_p_clean: float
    mean_p_corrupted: float
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (per-layer arrays as lists); ``average_effects.json`` holds it
        and :meth:`from_dict` reads it back."""
        return {
            "effects": {
                k: {c: np.asarray(v).tolist() for c, v in per.items()}
                for k, per in self.effects.items()
            },
            "counts": self.counts,
            "n_facts": self.n_facts,
            "mean_p_clean": self.mean_p_clean,
            "mean_p_corrupted": self.mean_p_corrupted,
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AverageEffects:
        """The averages a :meth:`to_dict` dict (an ``average_effects.json``) describes, the
        per-layer effects as float64 arrays."""
        return cls(
            effects={
                k: {c: np.asarray(v, dtype=np.float64) for c, v in per.items()}
                for k, per in d["effects"].items()
            },
            counts=d["counts"],
            n_facts=d["n_facts"],
            mean_p_clean=d["mean_p_clean"],
            mean_p_corrupted=d["mean_p_corrupted"],
            settings=d.get("settings", {}),
        )


@dataclass
class LayerSelection:
    """The contiguous window of MLP layers with the largest average effect, and the evidence."""

    layers: list[int]
    k: int
    kind: str
    token_class: str
    window_score: float
    per_layer_effect: list[float]
    n_facts: int
    model: str = ""
    by: str = "restoration"  # or "mediation" (tracing.localization.select_layers)

    def save(self, path: str | Path) -> Path:
        """Write as JSON (atomically); ``factscope edit --layers FILE`` reads it."""
        return write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> LayerSelection:
        """Read a selection written by :meth:`save` (``select-layers``' ``layers.json``)."""
        return cls(**json.loads(Path(path).read_text()))
