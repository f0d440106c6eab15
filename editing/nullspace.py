"""Old name of :mod:`editing.statistics.nullspace` (warns once, gives that module)."""

import sys
import warnings

from editing.statistics import nullspace as _moved
from editing.statistics.nullspace import *  # noqa: F403

warnings.warn(
    "editing.nullspace moved to editing.statistics.nullspace; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
