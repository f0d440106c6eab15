"""What every command shares: the model and progress options, output-folder checks, and
turning library keyword arguments into only those the user gave.

Options whose value the user did not give are left out of the namespace
(``argparse.SUPPRESS``), so the library's own defaults apply: the CLI keeps no defaults of
its own.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tracing.errors import InvalidInput

UNSET = argparse.SUPPRESS


def add_model(p: argparse.ArgumentParser) -> None:
    """``--model``: an embedded model name, a local Hugging Face folder or a cached hub id."""
    p.add_argument(
        "--model",
        default=UNSET,
        help="model name or local folder (default: the embedded gemma-3-270m)",
    )


def add_progress(p: argparse.ArgumentParser) -> None:
    """``--no-progress``: no progress bars."""
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def given(args: argparse.Namespace, *names: str, **renamed: str) -> dict[str, Any]:
    """The options among ``names`` (and ``renamed``: library name -> option name) that the
    user gave, as keyword arguments for a library call."""
    out = {n: getattr(args, n) for n in names if hasattr(args, n)}
    out.update({lib: getattr(args, opt) for lib, opt in renamed.items() if hasattr(args, opt)})
    return out


def load(args: argparse.Namespace) -> Any:
    """Load the model the user named (or the library's default)."""
    from tracing.models import load_model

    return load_model(args.model) if hasattr(args, "model") else load_model()


def output_folder(path: str) -> Path:
    """``path`` as an output folder: refused (before any work) if it is an existing file."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"--out {out} is an existing file, not a folder")
    return out


def input_file(path: str, what: str) -> Path:
    """``path`` as an existing input file, refused before any work otherwise."""
    src = Path(path)
    if not src.is_file():
        raise InvalidInput(f"{what} {src} does not exist or is not a file")
    return src
