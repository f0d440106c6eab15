"""Old name of :mod:`editing.targets.target_loss` (warns once, gives that module)."""

import sys
import warnings

from editing.targets import target_loss as _moved
from editing.targets.target_loss import *  # noqa: F403

warnings.warn(
    "editing.target_loss moved to editing.targets.target_loss; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
