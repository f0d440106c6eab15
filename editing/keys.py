"""Old name of :mod:`editing.statistics.keys` (warns once, gives that module)."""

import sys
import warnings

from editing.statistics import keys as _moved
from editing.statistics.keys import *  # noqa: F403

warnings.warn(
    "editing.keys moved to editing.statistics.keys; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
