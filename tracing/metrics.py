"""What a trace measures at the last position, and in which direction it patches.

**Metrics** (:data:`METRICS`), each averaged over the corrupted runs (one value per run, then
the mean), as the papers' probability is:

* ``prob`` (the papers', default): the answer's probability;
* ``logprob``: the answer's log-probability (the mean of per-run log-probabilities);
* ``logit-diff``: the answer's logit minus the competitor's (Wang et al. 2023; Heimersheim
  and Nanda 2024). The competitor is the corrupted run's top token (the argmax of the mean
  next-token distribution over the corrupted runs) or, under token replacement, the
  replacement subject's answer (:mod:`tracing.corruption`); a competitor equal to the answer
  is refused (the corruption did not change the prediction, so nothing is being contrasted).

**Normalised effect** (``normalise=True``): ``(m - m_corrupted) / (m_clean - m_corrupted)``,
0 at the corrupted run and 1 at the clean one whatever the metric and direction.

**Directions** (:data:`DIRECTIONS`): ``denoise`` (the papers') restores clean states into the
corrupted runs and reads how much of the answer comes back; ``noise`` patches each corrupted
run's state into the clean run (one clean row per corrupted run) and reads how much is lost
(:meth:`tracing.results.TraceResult.indirect_effect` is then ``m_clean - score``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float

from tracing.errors import InvalidInput

METRICS = ("prob", "logprob", "logit-diff")
DEFAULT_METRIC = "prob"
DIRECTIONS = ("denoise", "noise")
DEFAULT_DIRECTION = "denoise"
#: Metrics that compare the answer with a competitor token.
NEEDS_COMPETITOR = frozenset({"logit-diff"})


def check_metric(metric: str, direction: str) -> None:
    """Refuse an unknown metric or direction (one line naming the choices)."""
    if metric not in METRICS:
        raise InvalidInput(f"unknown metric {metric!r}; expected one of {METRICS}")
    if direction not in DIRECTIONS:
        raise InvalidInput(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")


@dataclass(frozen=True)
class Readout:
    """The per-run value of a metric from last-position logits (float32 ``[rows, vocab]``)."""

    metric: str
    answer_id: int
    competitor_id: int | None = None

    def __call__(self, logits: Float[torch.Tensor, "rows vocab"]) -> Float[torch.Tensor, " rows"]:
        if self.metric == "prob":
            return torch.softmax(logits, -1)[:, self.answer_id]
        if self.metric == "logprob":
            return torch.log_softmax(logits, -1)[:, self.answer_id]
        if self.competitor_id is None:
            raise InvalidInput(f"metric {self.metric!r} needs a competitor token")
        return logits[:, self.answer_id] - logits[:, self.competitor_id]


def corrupted_top(logits: Float[torch.Tensor, "rows vocab"]) -> int:
    """The corrupted runs' top token: the argmax of their mean next-token distribution."""
    return int(torch.softmax(logits.float(), -1).mean(0).argmax())


def normalised(
    scores: Float[np.ndarray, "..."], clean: float, corrupted: float
) -> Float[np.ndarray, "..."]:
    """``(scores - corrupted) / (clean - corrupted)``: 0 at the corrupted run, 1 at the clean
    one. Refused when the two runs give the same value (nothing to normalise by)."""
    span = clean - corrupted
    if not np.isfinite(span) or span == 0:
        raise InvalidInput(
            f"cannot normalise: the clean and corrupted runs give the same value ({clean:.6g})"
        )
    return (np.asarray(scores, dtype=np.float64) - corrupted) / span
