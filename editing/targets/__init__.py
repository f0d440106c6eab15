"""The v*/z target optimisation: the vector ROME writes (``v*``) and MEMIT spreads (``z``).

* :mod:`editing.targets.optimise`: where ``delta`` is added (the rewriting and KL prompts, the
  edit layer) and the runner that re-runs only what ``delta`` changes;
* :mod:`editing.targets.vocab_loss`: each read's loss and gradient in one sweep over the
  unembedding;
* :mod:`editing.targets.target_loss`: the objective (NLL of the new target, KL, weight decay);
* :mod:`editing.targets.objective`: Adam on that objective, requests in groups, across ranks;
* :mod:`editing.targets.cache`: each request's result on disk as soon as it is final.

Depends on :mod:`editing.requests`, :mod:`editing.edits` and :mod:`editing.hparams`; the
methods depend on it, never the other way. The old module ``editing.targets`` is now
:mod:`editing.targets.optimise`: its names are still given here, with a
``DeprecationWarning``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what ``from editing.targets import X`` gave before the move
    from editing.targets.optimise import DEFAULT_BATCH_TOKENS as DEFAULT_BATCH_TOKENS
    from editing.targets.optimise import KL_READ as KL_READ
    from editing.targets.optimise import NEIGHBOUR_READ as NEIGHBOUR_READ
    from editing.targets.optimise import READ_CODES as READ_CODES
    from editing.targets.optimise import DeltaRunner as DeltaRunner
    from editing.targets.optimise import KLPosition as KLPosition
    from editing.targets.optimise import ReadPass as ReadPass
    from editing.targets.optimise import RewritePrompt as RewritePrompt
    from editing.targets.optimise import TargetHook as TargetHook
    from editing.targets.optimise import check_edit_layer as check_edit_layer
    from editing.targets.optimise import rewrite_prompts as rewrite_prompts


_OLD_NAMES = frozenset(
    {
        "DEFAULT_BATCH_TOKENS", "KLPosition", "KL_READ", "NEIGHBOUR_READ", "READ_CODES",
        "DeltaRunner", "ReadPass", "RewritePrompt", "TargetHook", "check_edit_layer",
        "rewrite_prompts", "log",
    }
)  # fmt: skip


def __getattr__(name: str) -> Any:
    """The old ``editing.targets`` module's names, from :mod:`editing.targets.optimise`."""
    if name not in _OLD_NAMES:
        raise AttributeError(f"module 'editing.targets' has no attribute {name!r}")
    optimise = importlib.import_module("editing.targets.optimise")
    warnings.warn(
        f"editing.targets.{name} moved to editing.targets.optimise; import it from there",
        DeprecationWarning,
        stacklevel=2,
    )
    value = getattr(optimise, name)
    globals()[name] = value  # warned once: the next lookup finds it here
    return value
