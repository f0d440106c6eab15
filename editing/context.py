"""Old name of :mod:`editing.requests.context` (warns once, gives that module)."""

import sys
import warnings

from editing.requests import context as _moved
from editing.requests.context import *  # noqa: F403

warnings.warn(
    "editing.context moved to editing.requests.context; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
