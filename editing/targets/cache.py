"""Targets on disk, one file per request, written as soon as each is final.

A batch of thousands of MEMIT requests spends most of its time optimising one ``z`` per
request (:func:`editing.targets.objective.compute_targets`). :class:`TargetCache` keeps each
request's result (the state before, the vector added, the NLL before and after, the steps)
in its own small safetensors file the moment the request stops (converged, or out of steps),
so an interrupted batch resumes with only the unfinished requests.

A result is only valid for the exact model state, edit point and objective that made it, so
the cache's folder is named by a digest of the model's identity and current block weights
(:func:`editing.edits.weights.weights_key`: after another edit the old files are not reused; the
digests of tensors unchanged since they were last read, by torch's version counter, are
reused, so building a cache reads only what changed, not the model), the layer, the hook
and every target hyper-parameter; a file inside is named by a
digest of the request's token ids in every prompt it was prepared with.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from editing.edits.weights import weights_key
from editing.hparams import TargetHparams
from editing.requests.prepared import PreparedRequest
from tracing.io import atomic_path
from tracing.models import HookedModel


@dataclass(frozen=True)
class CachedTarget:
    """One request's finished optimisation: ``init`` and ``delta`` (float32, CPU), the
    target's mean NLL before and after, and the last step taken."""

    init: Float[torch.Tensor, " d_model"]
    delta: Float[torch.Tensor, " d_model"]
    nll_before: float
    nll_after: float
    steps: int


def request_key(p: PreparedRequest) -> str:
    """Digest of everything the optimisation reads from a prepared request: the target's
    ids, every rewriting prompt's ids and subject-last index, and the KL prompt's."""
    parts = [list(p.target), [[list(t.ids), t.subject_last] for t in p.prompts]]
    parts.append([list(p.kl.ids), p.kl.subject_last])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


class TargetCache:
    """Finished targets of one (model state, layer, hook, objective) under ``root``."""

    def __init__(
        self, root: str | Path, model: HookedModel, layer: int, hook: str, hp: TargetHparams
    ) -> None:
        setting = json.dumps(
            {
                "weights": weights_key(model, reuse=True),
                "layer": layer,
                "hook": hook,
                "hp": hp.to_dict(),
            },
            sort_keys=True,
        )
        self.folder = Path(root) / hashlib.sha256(setting.encode()).hexdigest()[:16]

    def _path(self, p: PreparedRequest) -> Path:
        return self.folder / f"{request_key(p)}.safetensors"

    def get(self, p: PreparedRequest) -> CachedTarget | None:
        """The stored result for ``p``, or None (also for an unreadable file, which is then
        recomputed)."""
        path = self._path(p)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError):
            return None
        info = tensors["info"].tolist()
        return CachedTarget(
            init=tensors["init"],
            delta=tensors["delta"],
            nll_before=float(info[0]),
            nll_after=float(info[1]),
            steps=int(info[2]),
        )

    def put(self, p: PreparedRequest, result: CachedTarget) -> None:
        """Store ``result`` for ``p`` (atomically: a killed process leaves no half file)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        info = torch.tensor([result.nll_before, result.nll_after, float(result.steps)])
        tensors = {
            "init": result.init.detach().float().cpu().contiguous(),
            "delta": result.delta.detach().float().cpu().contiguous(),
            "info": info.double(),
        }
        with atomic_path(self._path(p)) as tmp:
            save_file(tensors, str(tmp))
