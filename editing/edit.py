"""Old name of :mod:`editing.edits.edit` (warns once, gives that module)."""

import sys
import warnings

from editing.edits import edit as _moved
from editing.edits.edit import *  # noqa: F403

warnings.warn(
    "editing.edit moved to editing.edits.edit; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
