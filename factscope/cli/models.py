"""Commands ``models`` (what can be loaded here) and ``predict`` (top-k next tokens)."""

from __future__ import annotations

import argparse

from factscope.cli.common import UNSET, add_model, given, load, positive_int


def cmd_models(args: argparse.Namespace) -> None:
    """List the models that can be loaded without a network, then the supported model
    families with what has been tested on each (tracing.families)."""
    from tracing.families import FAMILIES
    from tracing.models import available_models

    rows = available_models()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        extra = f"  ({r['how']})" if r["how"] else ""
        print(f"{r['name']:<{width}}  {r['status']:<14}  {r['description']}{extra}")
    print()
    print("supported families (any local Hugging Face folder of these loads):")
    width = max(len(f.label) for f in FAMILIES.values())
    for fam in FAMILIES.values():
        print(f"  {fam.label:<{width}}  {'/'.join(fam.architectures)}: {fam.status}")


def cmd_predict(args: argparse.Namespace) -> None:
    """Top-k next tokens after each prompt, optionally with a saved edit applied."""
    from editing.edits.edit import Edit
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


def cmd_export(args: argparse.Namespace) -> None:
    """Write the model with a saved edit applied as a Hugging Face folder."""
    from editing.edits.edit import Edit
    from editing.edits.export import check_export_folder

    out = check_export_folder(args.out)
    edit = Edit.load(args.edit)
    if not hasattr(args, "model"):
        args.model = edit.model_name
    model = load(args)
    folder = edit.export(model, out)
    print(
        f"exported {edit.method} edit ({len(edit.requests)} request(s)) of {args.model} to {folder}"
    )
    print("load it without factscope: transformers.AutoModelForCausalLM.from_pretrained(FOLDER)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``models``, ``predict`` and ``export``."""
    p = sub.add_parser("models", help="list the models that can be loaded here (no network)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("predict", help="top-k next tokens after each prompt")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument(
        "-k", type=positive_int, default=UNSET, help="how many tokens to show (default 5)"
    )
    add_model(p)
    p.add_argument("--edit", help="folder of a saved edit to apply first")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write the edited model as a Hugging Face folder")
    p.add_argument("--edit", required=True, help="folder of a saved edit")
    p.add_argument("--out", required=True, help="new (or empty) folder to write")
    add_model(p)
    p.set_defaults(func=cmd_export)
