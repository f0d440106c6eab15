"""Old name of :mod:`editing.targets.objective` (warns once, gives that module)."""

import sys
import warnings

from editing.targets import objective as _moved
from editing.targets.objective import *  # noqa: F403
from editing.targets.objective import LOSS_SCALING as LOSS_SCALING
from editing.targets.objective import loss_scaler as loss_scaler

warnings.warn(
    "editing.objective moved to editing.targets.objective; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
