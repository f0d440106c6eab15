"""The cells of ``benchmarks/gpu.py``'s table: a measurement run guarded (its number, or
``OOM`` / ``error: ...`` with the traceback logged and the failure recorded), the rows, and
the number format."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

log = logging.getLogger("benchmarks.gpu")


@dataclass
class Failure:
    """One measurement that failed: what it was, and whether it ran out of memory."""

    what: str
    oom: bool
    message: str


@dataclass
class Row:
    """One model's line of the table: cells by column key."""

    model: str
    shape: str
    dtype: str
    device: str
    cells: dict[str, str] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt_number(x: float) -> str:
    """A positive number for a cell: thousands separators above 1,000, else 3 significant
    digits."""
    return f"{x:,.0f}" if x >= 1000 else f"{x:.3g}"


def failure_cell(what: str, exc: Exception, failures: list[Failure] | None) -> str:
    """The cell of a measurement that raised ``exc``: ``OOM`` or ``error: Type: first line``;
    the full traceback is logged (stderr) and the failure recorded in ``failures``."""
    from tracing.memory import is_out_of_memory

    oom = is_out_of_memory(exc)
    first = (str(exc).strip().splitlines() or [""])[0]
    log.error("%s failed (%s)", what, "out of memory" if oom else type(exc).__name__, exc_info=exc)
    cell = "OOM" if oom else f"error: {type(exc).__name__}: {first[:80]}".replace("|", "/")
    if failures is not None:
        failures.append(Failure(what, oom, cell))
    return cell


def guarded(
    what: str,
    fn: Callable[[], float],
    device: torch.device,
    failures: list[Failure] | None = None,
) -> str:
    """Run one measurement; its cell: the formatted number, ``OOM`` or ``error: ...`` (the
    traceback logged, the failure added to ``failures``)."""
    try:
        value = fn()
    except Exception as exc:  # any failure becomes a cell, never a crash of the table
        _free(device)
        return failure_cell(what, exc, failures)
    _free(device)
    log.info("%s: %s", what, fmt_number(value))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        log.info("%s: peak GPU memory so far %.1f GiB", what, peak)
    return fmt_number(value)
