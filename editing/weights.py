"""Old name of :mod:`editing.edits.weights` (warns once, gives that module)."""

import sys
import warnings

from editing.edits import weights as _moved
from editing.edits.weights import *  # noqa: F403

warnings.warn(
    "editing.weights moved to editing.edits.weights; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
