"""Old name of :mod:`editing.statistics.stats` (warns once, gives that module)."""

import sys
import warnings

from editing.statistics import stats as _moved
from editing.statistics.stats import *  # noqa: F403

warnings.warn(
    "editing.stats moved to editing.statistics.stats; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
