"""What defines an evaluation run: :class:`EvalConfig`, checked before any model is touched.

The runner (:mod:`editing.evaluation.runner`) and the run's summary
(:mod:`editing.evaluation.run_summary`) both read it; it depends on neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from editing.api import HparamsLike
from editing.evaluation.generation import GenerationSettings
from editing.evaluation.tasks import KNOWN_RULES, SPLITS
from editing.methods import get_method
from tracing.errors import InvalidInput

#: The method name of a run that edits nothing (the unedited model's scores).
NO_EDIT = "none"


@dataclass(frozen=True)
class EvalConfig:
    """Everything that defines an evaluation run.

    ``method``: a registered editing method or ``"none"`` (the unedited model). ``joint``:
    edit ``batch`` cases at once (default: only for batched methods such as MEMIT).
    ``hparams``: hyper-parameters (object, dict, JSON path) or None for the method's defaults;
    ``layers`` overrides the edited layers. ``only_known`` keeps CounterFact cases the
    unedited model knows (``known_rule``: ``prefers`` or ``top1``). ``generation``: fluency
    settings (None: no fluency). ``name``: the run folder inside ``out_dir`` (default
    ``<dataset>_<method>``). ``split``: ``eval`` (default) leaves CounterFact's tuning split
    out, ``tuning`` uses only it, ``all`` every case (see :data:`editing.evaluation.tasks.SPLITS`).
    """

    dataset: str | Path = "counterfact"
    method: str = "rome"
    n: int = 200
    batch: int = 100
    layers: Sequence[int] | None = None
    hparams: HparamsLike = None
    out_dir: str | Path = "results"
    only_known: bool = True
    known_rule: str = "prefers"
    seed: int = 0
    progress: bool = True
    joint: bool | None = None
    generation: GenerationSettings | None = field(default_factory=GenerationSettings)
    name: str | None = None
    split: str = "eval"

    def check(self) -> None:
        """Refuse settings that cannot work, before any model is touched."""
        if self.method != NO_EDIT:
            get_method(self.method)
        if self.n < 1 or self.batch < 1:
            raise InvalidInput(
                f"n and batch must be at least 1 (got n={self.n}, batch={self.batch})"
            )
        if self.split not in SPLITS:
            raise InvalidInput(f"unknown split {self.split!r}; expected one of {SPLITS}")
        if self.known_rule not in KNOWN_RULES:
            raise InvalidInput(
                f"unknown known_rule {self.known_rule!r}; expected one of {KNOWN_RULES}"
            )

    @property
    def is_joint(self) -> bool:
        """Whether ``batch`` cases are edited at once."""
        if self.joint is not None:
            return bool(self.joint)
        return self.method != NO_EDIT and get_method(self.method).batched
