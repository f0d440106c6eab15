"""Old name of :mod:`editing.statistics.corpus` (warns once, gives that module)."""

import sys
import warnings

from editing.statistics import corpus as _moved
from editing.statistics.corpus import *  # noqa: F403

warnings.warn(
    "editing.corpus moved to editing.statistics.corpus; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
