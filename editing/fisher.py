"""Old name of :mod:`editing.statistics.fisher` (warns once, gives that module)."""

import sys
import warnings

from editing.statistics import fisher as _moved
from editing.statistics.fisher import *  # noqa: F403

warnings.warn(
    "editing.fisher moved to editing.statistics.fisher; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
