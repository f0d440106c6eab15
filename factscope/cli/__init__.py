"""The ``factscope`` command line: parses arguments, calls the library, prints results.

One module per area (:mod:`~factscope.cli.models`, :mod:`~factscope.cli.tracing`,
:mod:`~factscope.cli.editing`, :mod:`~factscope.cli.evaluation`, :mod:`~factscope.cli.sweep`),
each registering its commands; every command is a function ``cmd_*(args)``. Options the
user leaves out are not passed on, so the library's defaults apply. Bad input (a
:class:`~tracing.errors.FactscopeError`) prints one ``error: ...`` line and exits 2; any
other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from factscope import __version__
from factscope.cli import editing, evaluation, models, sweep, tracing
from factscope.cli.common import check_placement
from tracing.distributed import init_from_env, leave
from tracing.errors import FactscopeError, InvalidInput

SECTIONS = (models, tracing, editing, evaluation, sweep)


class UsageError(InvalidInput):
    """A command line argparse refused (an unknown option, a count below 1, ...)."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose refusals are one line: it raises :class:`UsageError`
    (``main`` prints ``error: ...`` and returns 2) instead of printing its usage and exiting."""

    def error(self, message: str) -> NoReturn:  # noqa: D102 (argparse's hook)
        raise UsageError(f"{message} (see {self.prog} -h)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = OneLineParser(
        prog="factscope", description="Locate and edit facts in transformer language models."
    )
    parser.add_argument("--version", action="version", version=f"factscope {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for section in SECTIONS:
        section.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        check_placement(args)
        here = init_from_env(settings=list(sys.argv[1:] if argv is None else argv))
        if not here.is_main:  # under torchrun only rank 0 prints results
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the process's lifetime)
        args.func(args)
    except FactscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        leave()
    return 0
