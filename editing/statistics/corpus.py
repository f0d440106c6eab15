"""Files shipped in ``editing/data``: where they are, and the WikiText-2 text that
second-moment statistics (and later perplexity) read. The data's provenance and licences are
in ``editing/data/NOTICE.md``."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

from tracing.errors import InvalidInput

WIKITEXT_SPLITS = ("test", "valid")


def data_path(name: str) -> Path:
    """Path of a data file shipped in ``editing/data``."""
    return Path(str(files("editing").joinpath("data").joinpath(name)))


def wikitext_paragraphs(split: str = "test", min_chars: int = 1) -> Iterator[str]:
    """Paragraphs of the shipped WikiText-2 raw text (``test`` or ``valid``), in file order,
    skipping headings (`` = ... = ``) and blank lines."""
    if split not in WIKITEXT_SPLITS:
        raise InvalidInput(f"unknown WikiText-2 split {split!r}; shipped: 'test', 'valid'")
    with gzip.open(data_path(f"wikitext2_{split}.raw.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            text = line.strip()
            if len(text) < min_chars or (text.startswith("=") and text.endswith("=")):
                continue
            yield text
