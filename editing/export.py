"""Old name of :mod:`editing.edits.export` (warns once, gives that module)."""

import sys
import warnings

from editing.edits import export as _moved
from editing.edits.export import *  # noqa: F403

warnings.warn(
    "editing.export moved to editing.edits.export; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
