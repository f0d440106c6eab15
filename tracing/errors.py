"""The errors factscope raises for bad input and for edits that cannot be made.

Every error a user can cause (a wrong argument, a malformed file, a request the model cannot
take, hyper-parameters out of range, a model that is not available here) is a
:class:`FactscopeError`; anything else that escapes factscope is a bug and keeps its
traceback. :class:`FactscopeError` derives from :class:`ValueError`, so ``except ValueError``
keeps working for callers that only care that the input was refused.

The command line turns exactly these into one-line ``error: ...`` messages with exit code 2;
the evaluation runner counts :class:`InvalidRequest` and :class:`EditFailed` as failed cases
and stops on anything else.
"""

from __future__ import annotations


class FactscopeError(ValueError):
    """Input factscope refuses, or work it cannot do; the message says what and why."""


class InvalidInput(FactscopeError):
    """An argument, file or data record is malformed or out of range."""


class InvalidRequest(InvalidInput):
    """An edit request the model cannot take (bad template, empty target, conflict, ...)."""


class InvalidHparams(InvalidInput):
    """Hyper-parameters that are unknown, malformed or out of range."""


class ModelLoadError(FactscopeError):
    """A model could not be loaded (missing package, weights not local, broken files)."""


class EditFailed(FactscopeError):
    """An edit could not be computed (singular statistics, non-finite values); the model's
    weights are exactly as they were before the attempt."""
