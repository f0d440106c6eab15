"""Old name of :mod:`editing.targets.vocab_loss` (warns once, gives that module)."""

import sys
import warnings

from editing.targets import vocab_loss as _moved
from editing.targets.vocab_loss import *  # noqa: F403

warnings.warn(
    "editing.vocab_loss moved to editing.targets.vocab_loss; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
