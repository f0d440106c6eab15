"""What every command shares: the model and progress options, output-folder checks, and
turning library keyword arguments into only those the user gave.

Options whose value the user did not give are left out of the namespace
(``argparse.SUPPRESS``), so the library's own defaults apply: the CLI keeps no defaults of
its own.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tracing.errors import InvalidInput

UNSET = argparse.SUPPRESS


def _number_type(
    kind: type[int] | type[float], least: int | float, strict: bool, what: str, doc: str
) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses ``kind`` and refuses values below ``least`` (or equal
    to it when ``strict``) and non-finite ones, naming ``what`` was expected."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < least or (strict and value == least):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the expected value by it
    parse.__doc__ = doc
    return parse


positive_int = _number_type(
    int,
    1,
    False,
    "an integer >= 1",
    """The integer in ``text`` if it is at least 1: argparse ``type=`` of counts, sizes and steps.

    Anything else is refused while the command line is parsed, before a file is read or a
    model loaded: ``add_argument("-k", type=positive_int)`` turns ``-k 0`` into exit 2 with
    ``argument -k: expected an integer >= 1, got '0'`` (``2.5`` and ``ten`` likewise).
    """,
)
nonnegative_int = _number_type(
    int,
    0,
    False,
    "an integer >= 0",
    """The integer in ``text`` if it is at least 0: argparse ``type=`` of a seed, or of a count
    where 0 means none (``--gen-tokens 0``). ``-1`` is refused while parsing (exit 2,
    ``expected an integer >= 0, got '-1'``).""",
)
positive_float = _number_type(
    float,
    0,
    True,
    "a number > 0",
    """The number in ``text`` if it is finite and above 0: argparse ``type=`` of a bound, a
    scale or a learning rate. ``0``, ``-1e-3``, ``nan`` and ``inf`` are refused while parsing
    (exit 2, ``expected a number > 0, got '0'``).""",
)
nonnegative_float = _number_type(
    float,
    0,
    False,
    "a number >= 0",
    """The number in ``text`` if it is finite and at least 0: argparse ``type=`` of a penalty
    weight, where 0 turns the penalty off. Negative numbers, ``nan`` and ``inf`` are refused
    while parsing (exit 2, ``expected a number >= 0, got '-1'``).""",
)


def add_model(p: argparse.ArgumentParser) -> None:
    """``--model`` (an embedded model name, a local Hugging Face folder or a cached hub id) and
    where and how it runs: ``--device``, ``--dtype``, ``--device-map``, ``--offload-folder``,
    ``--max-batch-tokens``."""
    p.add_argument(
        "--model",
        default=UNSET,
        help="model name or local folder (default: the embedded gemma-3-270m)",
    )
    p.add_argument(
        "--device",
        default=UNSET,
        help="cpu, cuda, cuda:N or auto (default auto: CUDA when present, else the CPU)",
    )
    p.add_argument(
        "--dtype",
        default=UNSET,
        help="float32, bfloat16, float16 or auto (default auto: float32 on the CPU; on CUDA "
        "bfloat16 above ~1B parameters)",
    )
    p.add_argument(
        "--device-map",
        default=UNSET,
        help="a model split over devices: auto, balanced, sequential, a JSON object "
        '{"module": "cuda:0" | "cpu" | "disk"} or a .json file of one (accelerate places it)',
    )
    p.add_argument("--offload-folder", default=UNSET, help="folder for blocks mapped to 'disk'")
    p.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        default=UNSET,
        help="tokens per forward pass; for the target optimisation, positions re-run with "
        "gradient per pass (default: from the device's free memory on CUDA, the measured "
        "defaults on the CPU)",
    )


def add_case_selection(p: argparse.ArgumentParser) -> None:
    """Which CounterFact cases a run takes: ``--split``, ``--all-cases``, ``--known-rule``
    (``eval`` and ``layer-sweep`` choose cases the same way)."""
    p.add_argument(
        "--split",
        default=UNSET,
        choices=("eval", "tuning", "all"),
        help="CounterFact cases: eval (default: the tuning split left out), tuning, or all",
    )
    p.add_argument("--all-cases", action="store_true", help="keep cases the model does not know")
    p.add_argument(
        "--known-rule",
        default=UNSET,
        choices=("prefers", "top1"),
        help="'known': P(true) > P(new) (prefers; eval's default) or true target top-1 "
        "(top1; layer-sweep's default)",
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


def check_placement(args: argparse.Namespace) -> None:
    """``--model``, ``--device``, ``--dtype`` and ``--device-map`` name things that exist here
    (a model folder that is there, an installed embedded model; no ``cuda`` without CUDA, no
    GPU index past the last; a device map's every device): checked right after parsing,
    before any file is read or weight loaded, without importing the model libraries."""
    from tracing.devices import check_placement as check
    from tracing.model_cache import resolve_source

    check(**given(args, "device", "dtype", "device_map"))  # --max-batch-tokens: positive_int
    if hasattr(args, "model"):
        resolve_source(args.model, build=False)


def load(args: argparse.Namespace) -> Any:
    """Load the model the user named (or the library's default), where they said."""
    from tracing.distributed import together
    from tracing.memory import set_batch_tokens
    from tracing.models import load_model

    where = given(args, "device", "dtype", "device_map", "offload_folder")
    if hasattr(args, "model"):
        model = together(lambda: load_model(args.model, **where))
    else:
        model = together(lambda: load_model(**where))
    if hasattr(args, "max_batch_tokens"):
        set_batch_tokens(model, args.max_batch_tokens)
    if getattr(args, "chat_template", False):  # before anything runs (tracing.chat)
        from tracing.chat import use_chat_template

        use_chat_template(model)
    return model


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
