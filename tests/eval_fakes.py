"""Stand-ins the evaluation runner's tests edit and score with (tests/test_evaluate.py): a
fixed weight change applied and undone like an :class:`editing.edits.edit.Edit`, a
``make_edit`` that records its calls, and a scorer that decides by hand which cases the
unedited model knows."""

from __future__ import annotations

import contextlib

import torch

from tracing.models import down_proj


class FakeEdit:
    """Adds a fixed delta to one down-projection inside ``applied`` and restores it after."""

    hparams = {"fake": True}

    def __init__(self, layer: int, scale: float, leak: bool = False) -> None:
        self.layer, self.scale, self.leak = layer, scale, leak

    @contextlib.contextmanager
    def applied(self, model):
        w = down_proj(model, self.layer)
        saved = w.detach().clone()
        with torch.no_grad():
            w.add_(self.scale)
        try:
            yield self
        finally:
            if not self.leak:
                with torch.no_grad():
                    w.copy_(saved)


class FakeMethod:
    """Stand-in for editing.api.make_edit that records the case ids of every call."""

    def __init__(self, interrupt_at: int | None = None, leak: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.interrupt_at, self.leak = interrupt_at, leak

    def __call__(self, model, requests, method, hparams, *, layers=None, progress=True):
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append([r.case_id for r in requests])
        return FakeEdit(layer=1, scale=0.5, leak=self.leak)


def model_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.original_model.state_dict().items()}


class KnownScorer:
    """The tiny model's scores, except that the true target wins on the edit prompts of
    ``known`` cases and loses elsewhere (so which cases are "known" is set by hand)."""

    def __init__(self, model, records, known: set[int]) -> None:
        from editing.evaluation.metrics import ModelScorer, TokenScores

        self.base, self.cls = ModelScorer(model), TokenScores
        self.true = {(r["prompt"], " " + r["ground_truth"]): r["case_id"] in known for r in records}

    def score(self, pairs):
        out = self.base.score(pairs)
        for i, pair in enumerate(pairs):
            if pair in self.true:
                lp = 0.0 if self.true[pair] else -50.0
                out[i] = self.cls(out[i].target, (lp,) * len(out[i].target), out[i].argmax)
        return out
