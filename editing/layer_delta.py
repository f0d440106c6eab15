"""Old name of :mod:`editing.edits.layer_delta` (warns once, gives that module)."""

import sys
import warnings

from editing.edits import layer_delta as _moved
from editing.edits.layer_delta import *  # noqa: F403

warnings.warn(
    "editing.layer_delta moved to editing.edits.layer_delta; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
