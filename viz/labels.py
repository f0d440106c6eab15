"""Labels of trace figures shared by the matplotlib and plotly heatmaps: panel titles and
short names per kind, token and answer labels, colour-bar and axis labels, and the checked
choice of kinds to draw. Plain strings from :class:`tracing.results.TraceResult` values;
nothing here draws or runs a model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tracing.errors import InvalidInput
from tracing.results import ALL_KINDS, TraceResult
from viz.plots import metric_label

#: Panel titles per kind.
TITLES = {
    "resid": "Restoring state after corrupted input",
    "mlp": "Restoring MLP after corrupted input",
    "attn": "Restoring Attn after corrupted input",
    "resid/mlp-severed": "Restoring state, MLP severed",
    "resid/attn-severed": "Restoring state, Attn severed",
}
#: Short names per kind.
SHORT = {
    "resid": "state",
    "mlp": "MLP",
    "attn": "Attn",
    "resid/mlp-severed": "state (MLP severed)",
    "resid/attn-severed": "state (Attn severed)",
}


def panel_title(result: TraceResult, kind: str) -> str:
    """A panel's title: what is patched (``Corrupting ...`` under ``direction="noise"``)."""
    title = TITLES.get(kind, f"Restoring {kind}")
    if getattr(result.settings, "direction", "denoise") == "noise":
        title = title.replace("Restoring", "Corrupting").replace(
            "after corrupted input", "in the clean run"
        )
    return title


def score_label(result: TraceResult) -> str:
    """Colour-bar label of a trace's scores (the metric, or ``normalised effect``)."""
    s = result.settings
    return metric_label(
        getattr(s, "metric", "prob"),
        answer_label(result.answer),
        result.competitor,
        bool(getattr(s, "normalise", False)),
    )


def base_style(kind: str) -> str:
    """The kind whose colours a kind is drawn in (a severed kind: its restored kind)."""
    return kind.split("/")[0]


def token_labels(result: TraceResult) -> list[str]:
    """The prompt's tokens as axis labels: trimmed, newlines shown as ``\\n``, whitespace-only
    tokens shown quoted, and every token of the subject span marked with a trailing ``*``."""
    start, end = result.subject_span
    labels = []
    for i, tok in enumerate(result.tokens):
        text = tok.replace("\n", "\\n").replace("\t", "\\t").strip()
        if not text:
            text = repr(tok)
        labels.append(text + "*" if start <= i < end else text)
    return labels


def answer_label(answer: str) -> str:
    """``answer`` for titles: trimmed, or quoted when it is only whitespace."""
    text = answer.strip()
    return text if text else repr(answer)


def short_prompt(prompt: str, limit: int = 90) -> str:
    """The prompt quoted for a title, cut to ``limit`` characters with an ellipsis."""
    text = prompt if len(prompt) <= limit else prompt[: limit - 1] + "…"
    return repr(text)


def resolve_kinds(result: TraceResult, kinds: Sequence[str] | str | None) -> list[str]:
    """The kinds to draw: ``kinds`` (validated against the result) or all the result holds, in
    the order resid, mlp, attn."""
    if kinds is None:
        chosen = [k for k in ALL_KINDS if k in result.scores] + [
            k for k in result.scores if k not in ALL_KINDS
        ]
    else:
        chosen = [kinds] if isinstance(kinds, str) else list(kinds)
    if not chosen:
        raise InvalidInput("no kinds to draw: the result holds no scores and none were asked for")
    missing = [k for k in chosen if k not in result.scores]
    if missing:
        raise InvalidInput(
            f"kinds {missing} are not in this trace (it holds {sorted(result.scores)})"
        )
    for k in chosen:
        arr = np.asarray(result.scores[k])
        if arr.ndim != 2 or arr.shape[0] != len(result.tokens):
            raise InvalidInput(
                f"scores[{k!r}] has shape {arr.shape}; expected [tokens={len(result.tokens)}, "
                "layers]"
            )
    return chosen


def window_text(result: TraceResult, kind: str) -> str:
    """How many layers each restoration covered, e.g. ``"window 10"`` (empty when unknown)."""
    window = getattr(result.settings, "window", None) or {}
    w = window.get(kind)
    if w is None:
        return ""
    return "single layer" if int(w) == 1 else f"window {int(w)}"


def xlabel(result: TraceResult, kind: str) -> str:
    """x-axis label: the restored layer, or the centre of the restored window."""
    window = getattr(result.settings, "window", None) or {}
    w = window.get(kind)
    if w is None or int(w) == 1:
        return "single restored layer"
    return f"centre of interval of {int(w)} restored layers"
