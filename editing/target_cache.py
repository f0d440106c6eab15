"""Old name of :mod:`editing.targets.cache` (warns once, gives that module)."""

import sys
import warnings

from editing.targets import cache as _moved
from editing.targets.cache import *  # noqa: F403

warnings.warn(
    "editing.target_cache moved to editing.targets.cache; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
