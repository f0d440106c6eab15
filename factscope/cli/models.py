"""Commands ``models`` (what can be loaded here) and ``predict`` (top-k next tokens)."""

from __future__ import annotations

import argparse

from factscope.cli.common import UNSET, add_model, given, load


def cmd_models(args: argparse.Namespace) -> None:
    """List the models that can be loaded without a network."""
    from tracing.models import available_models

    rows = available_models()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        extra = f"  ({r['how']})" if r["how"] else ""
        print(f"{r['name']:<{width}}  {r['status']:<14}  {r['description']}{extra}")


def cmd_predict(args: argparse.Namespace) -> None:
    """Top-k next tokens after each prompt, optionally with a saved edit applied."""
    from editing.edit import Edit
    from tracing.forward import top_k

    edit = Edit.load(args.edit) if args.edit else None
    model = load(args)
    if edit is not None:
        edit.apply(model)
        print(f"# with edit {args.edit} ({edit.method}, {len(edit.requests)} request(s))")
    for prompt in args.prompts:
        print(prompt)
        for token, p in top_k(model, prompt, **given(args, "k")):
            print(f"  {p:8.4f}  {token!r}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``models`` and ``predict``."""
    p = sub.add_parser("models", help="list the models that can be loaded here (no network)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("predict", help="top-k next tokens after each prompt")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("-k", type=int, default=UNSET, help="how many tokens to show (default 5)")
    add_model(p)
    p.add_argument("--edit", help="folder of a saved edit to apply first")
    p.set_defaults(func=cmd_predict)
