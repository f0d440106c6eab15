"""Old name of :mod:`editing.requests.prepared` (warns once, gives that module)."""

import sys
import warnings

from editing.requests import prepared as _moved
from editing.requests.prepared import *  # noqa: F403

warnings.warn(
    "editing.prepared moved to editing.requests.prepared; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
