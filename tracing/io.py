"""Writing files so that a killed process never leaves a half-written one behind.

Every file factscope saves (traces, layer selections, edits, statistics, caches, evaluation
summaries) goes through :func:`atomic_path` or :func:`write_json_atomic`: the content is
written to a temporary name in the same folder and renamed over the target in one step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a normal exit it is renamed to ``path``
    (replacing any old file), on an error it is removed. Parent folders are created."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, data: Any, *, indent: int | None = 1) -> Path:
    """Write ``data`` as JSON to ``path`` atomically; returns the path."""
    return write_text_atomic(path, json.dumps(data, indent=indent))
