"""Old name of :mod:`editing.edits.format` (warns once, gives that module)."""

import sys
import warnings

from editing.edits import format as _moved
from editing.edits.format import *  # noqa: F403

warnings.warn(
    "editing.edit_format moved to editing.edits.format; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
