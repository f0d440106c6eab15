"""MkDocs hook of factscope's docs: pages generated at build time, so they cannot drift.

* ``reference/cli.md``: every command and option of :func:`factscope.cli.build_parser`;
* ``reference/api/*.md``: one page per package (``factscope``, ``tracing``, ``editing``,
  ``editing.edits``, ``editing.statistics``, ``editing.targets``, ``editing.methods``,
  ``editing.evaluation``, ``viz``: :data:`API_PAGES`), its modules rendered by mkdocstrings;
* ``notebooks/*.ipynb``: the four notebooks as stored (executed, with outputs; rendered by
  mkdocs-jupyter without running them);
* a warning (an error under ``mkdocs build --strict``) for every public name without a
  docstring (``docs/hooks/docstrings.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docstrings import missing_docstrings, public_modules  # noqa: E402

log = logging.getLogger("mkdocs.hooks.factscope")

# Public names in modules being rewritten elsewhere, documented there next; each must still
# lack its docstring (so this list can only shrink) and nothing else may.
PENDING: frozenset[str] = frozenset()

# One API page per package: (page, title, packages whose modules it holds, what it is). The
# editing rooms (edits, statistics, targets) depend on the shared pieces of ``editing`` and
# on tracing; the methods on the rooms; the evaluation on the methods.
API_PAGES: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("factscope", "factscope", ("factscope",), "The front door and the command line."),
    ("tracing", "tracing", ("tracing",), "The base: models, causal tracing, localisation."),
    (
        "editing",
        "editing",
        ("editing",),
        "The entry point `make_edit`, edit requests and their templates, hyper-parameters, "
        "parameter names.",
    ),
    (
        "editing.edits",
        "editing.edits",
        ("editing.edits",),
        "The `Edit` value: its deltas, its disk format, the weights it changes, export.",
    ),
    (
        "editing.statistics",
        "editing.statistics",
        ("editing.statistics",),
        "Keys and their statistics: second moments, the null space, the Fisher information.",
    ),
    (
        "editing.targets",
        "editing.targets",
        ("editing.targets",),
        "The v*/z target optimisation: prompts, loss, Adam, the cache of results.",
    ),
    ("editing.methods", "editing.methods", ("editing.methods",), "One module per method."),
    ("editing.evaluation", "editing.evaluation", ("editing.evaluation",), "Tasks and runners."),
    ("viz", "viz", ("viz",), "Pictures of result values."),
)
NOTEBOOKS = ROOT / "notebooks"


def docstring_problems() -> list[str]:
    """One message per public name without a docstring, and per stale ``PENDING`` entry."""
    missing = set(missing_docstrings())
    problems = [f"public name without a docstring: {name}" for name in sorted(missing - PENDING)]
    problems += [
        f"{name} has a docstring now: remove it from PENDING in docs/hooks/generate.py"
        for name in sorted(PENDING - missing)
    ]
    return problems


def _modules_of(page_package: str) -> list[str]:
    """The package and its public modules, leaving out subpackages that have their own page."""
    own_pages = {p for p, *_ in API_PAGES}
    names: list[str] = []
    for module in public_modules(page_package):
        name = module.__name__  # an old name that moved gives its module under the new name
        inside = [p for p in own_pages if name == p or name.startswith(p + ".")]
        if max(inside, key=len) == page_package and name not in names:
            names.append(name)
    return names


def api_page(package: str, title: str, blurb: str) -> str:
    """Markdown of one package's API page: its docstring, then each module."""
    lines = [f"# `{title}`", "", blurb, ""]
    if package == "factscope":
        lines += front_door_table()
    for name in _modules_of(package):
        lines += [f"::: {name}", ""]
    return "\n".join(lines)


def front_door_table() -> list[str]:
    """What ``import factscope as fs`` exposes, each name linked to where it is defined."""
    import factscope

    rows = ["| `fs.` name | defined in |", "|---|---|"]
    for name in factscope.__all__:
        home = factscope._NAMES[name]
        rows.append(f"| [`fs.{name}`][{home}.{name}] | `{home}` |")
    return ["`import factscope as fs` exposes these names (imported on first use):", "", *rows, ""]


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _options(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    rows = ["| option | value | default | what it does |", "|---|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
        if action.choices is not None:
            value = " \\| ".join(f"`{c}`" for c in action.choices)
        elif action.nargs == 0:
            value = "flag"
        else:
            value = f"`{action.metavar or action.dest.upper()}`"
            if action.nargs in ("*", "+"):
                value += " …"
        default = action.default
        hidden = default in (None, argparse.SUPPRESS, False) or not action.option_strings
        shown = "" if hidden else f"`{default}`"
        helptext = formatter._expand_help(action) if action.help else ""
        rows.append(f"| {name} | {value} | {_cell(shown)} | {_cell(helptext)} |")
    return rows if len(rows) > 2 else ["No options."]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _summaries(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each sub-command's one-line ``help`` as the parent parser lists it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def cli_page() -> str:
    """Markdown of every command of ``factscope`` with its usage and options."""
    from factscope.cli import build_parser

    parser = build_parser()
    lines = [
        "# Command line",
        "",
        "Generated from `factscope.cli.build_parser()` when the docs are built. Every command",
        "exits 2 with one `error: ...` line on bad input. `python -m factscope` is the same",
        "program; under torchrun write `--n-facts`/`--n-cases` for `--n`.",
        "",
        "```text",
        parser.format_usage().strip(),
        "```",
        "",
        *_options(parser),
        "",
    ]

    def walk(prefix: str, sub: argparse.ArgumentParser) -> None:
        summaries = _summaries(sub)
        for name, child in _subcommands(sub).items():
            full = f"{prefix} {name}"
            lines.extend([f"## `{full}`", ""])
            if summaries.get(name):
                lines.extend([summaries[name][:1].upper() + summaries[name][1:] + ".", ""])
            if child.description:
                lines.extend([child.description, ""])
            lines.extend(["```text", child.format_usage().strip(), "```", "", *_options(child), ""])
            walk(full, child)

    walk("factscope", parser)
    return "\n".join(lines)


HPARAMS = ROOT / "editing" / "hparams_defaults"
HPARAMS_MARK = re.compile(r"<!-- hparams:([a-z]+) -->")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict) and key == "target":
            out.update(_flat(value, f"{key}."))
        else:
            out[prefix + key] = value
    return out


def hparams_table(family: str) -> str:
    """Markdown table of a method family's shipped default files (one column per model), with
    each file's own account of where its numbers come from."""
    default = f"{family}_default"
    paths = sorted(HPARAMS.glob(f"{family}_*.json"), key=lambda p: (p.stem != default, p.stem))
    if not paths:
        raise ValueError(f"no hyper-parameter files for {family!r} in {HPARAMS}")
    files = {p.stem.removeprefix(f"{family}_"): json.loads(p.read_text()) for p in paths}
    flat = {name: _flat(d) for name, d in files.items()}
    keys = list(dict.fromkeys(k for d in flat.values() for k in d))
    lines = [
        "| setting | " + " | ".join(f"`{n}`" for n in flat) + " |",
        "|---|" + "---|" * len(flat),
    ]
    for key in keys:
        cells = [_cell(json.dumps(flat[n][key]) if key in flat[n] else "–") for n in flat]
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    lines.append("")
    for name, d in files.items():
        source = d.get("_source")
        if source:
            text = source if isinstance(source, str) else json.dumps(source)
            lines += [f'??? note "`{family}_{name}.json`: where its numbers come from"', ""]
            lines += ["    " + text.replace("\n", " "), ""]
    return "\n".join(lines)


FAMILY_NAMES = {
    "gpt2": "GPT-2", "gptj": "GPT-J", "llama": "Llama", "gemma3": "Gemma 3", "qwen2": "Qwen2",
    "qwen3": "Qwen3", "mistral": "Mistral", "phi3": "Phi-3", "gptneox": "GPT-NeoX",
    "olmo2": "OLMo-2", "gemma2": "Gemma 2",
}  # fmt: skip


def families_table() -> str:
    """The architectures :mod:`tracing.toy_models` builds tiny models of, as tested."""
    from tracing import toy_models

    shared = tuple(toy_models.ARCHS)
    further = tuple(getattr(toy_models, "FAMILIES", ()))
    lines = ["| family | `build_toy_model` name | tested |", "|---|---|---|"]
    for arch in (*shared, *further):
        tested = "every test's tiny-model fixtures" if arch in shared else "its own tiny model"
        lines.append(f"| {FAMILY_NAMES.get(arch, arch)} | `{arch}` | {tested} |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace each ``<!-- hparams:FAMILY -->`` with that family's defaults table and
    ``<!-- families -->`` with the tested architectures."""
    markdown = markdown.replace("<!-- families -->", families_table())
    return HPARAMS_MARK.sub(lambda m: hparams_table(m.group(1)), markdown)


def on_pre_build(config: Any) -> None:
    """Warn (fail under ``--strict``) for every public name without a docstring."""
    for problem in docstring_problems():
        log.warning(problem)


@event_priority(100)  # before mkdocs-jupyter, so it sees the notebooks added here
def on_files(files: Files, config: Any) -> Files:
    """Add the generated reference pages and the stored notebooks to the site."""
    files.append(File.generated(config, "reference/cli.md", content=cli_page()))
    for page, title, (package,), blurb in API_PAGES:
        content = api_page(package, title, blurb)
        files.append(File.generated(config, f"reference/api/{page}.md", content=content))
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        files.append(
            File(
                f"notebooks/{notebook.name}",
                src_dir=str(ROOT),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files
