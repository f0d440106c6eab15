"""The examples of README.md and the user guide (docs/guide/*.md) cannot rot.

* Every ```python block runs: a page's blocks one after another in one namespace, in a
  scratch working folder, as a reader would paste them. Blocks build tiny random models
  (``tracing.toy_models.build_toy_model``) unless the line before the block is
  ``<!-- example: model -->``: such a page runs on the embedded model and is marked ``model``.
* Every ``factscope ...`` command of a ```bash block is parsed by the real parser
  (``factscope.cli.build_parser``), so a renamed option or command fails here.
* Every public name has a docstring (the docs build checks the same, ``docs/hooks``).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs" / "guide").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.M | re.S)
MODEL_MARK = "<!-- example: model -->"


def blocks(page: Path, language: str) -> list[tuple[str, bool]]:
    """The ``language`` blocks of ``page`` in order, each with whether it is marked ``model``."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        if match.group(1) != language:
            continue
        before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
        found.append((match.group(2), before.strip() == MODEL_MARK))
    return found


def _python_pages() -> list:
    params = []
    for page in PAGES:
        found = blocks(page, "python")
        if not found:
            continue
        marks = [pytest.mark.model] if any(is_model for _, is_model in found) else []
        params.append(pytest.param(page, id=page.name, marks=marks))
    return params


def factscope_commands(script: str) -> list[list[str]]:
    """The argument lists of every ``factscope`` command in a shell script (``.venv/bin/``,
    ``python -m`` and ``torchrun ... -m`` forms too; comments, ``&&`` chains, continuations)."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        for part in re.split(r"&&|\|\||;", line):
            words = shlex.split(part, comments=True)
            for i, word in enumerate(words):
                if word.endswith("factscope") and (
                    word in ("factscope", ".venv/bin/factscope") or words[i - 1] == "-m"
                ):
                    commands.append(words[i + 1 :])
                    break
    return commands


def test_the_examples_are_found():
    """The extraction finds the README's tour and the guide's examples (a changed fence
    convention would otherwise pass silently)."""
    assert blocks(ROOT / "README.md", "python")
    assert sum(len(blocks(p, "python")) for p in PAGES) >= 8
    assert sum(len(factscope_commands(s)) for p in PAGES for s, _ in blocks(p, "bash")) >= 30


@pytest.mark.parametrize("page", _python_pages())
def test_python_examples_run(page, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    found = blocks(page, "python")
    monkeypatch.chdir(tmp_path)
    if not any(is_model for _, is_model in found):  # tiny models: their caches stay here
        monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    namespace: dict = {"__name__": f"example_{page.stem}"}
    try:
        for number, (code, _) in enumerate(found, 1):
            exec(compile(code, f"{page.name}, python block {number}", "exec"), namespace)
    finally:
        plt.close("all")


@pytest.mark.parametrize("page", [pytest.param(p, id=p.name) for p in PAGES])
def test_shell_commands_parse(page):
    from factscope.cli import UsageError, build_parser

    parser = build_parser()
    for script, _ in blocks(page, "bash"):
        for args in factscope_commands(script):
            try:
                parser.parse_args(args)
            except (SystemExit, UsageError) as exc:
                pytest.fail(f"{page.name}: `factscope {shlex.join(args)}` does not parse ({exc})")


def test_every_public_name_has_a_docstring():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs/hooks/generate.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    assert hooks.docstring_problems() == []


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub and MkDocs' default toc write it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_links_resolve():
    """README.md is not part of the docs site, so its relative links and their anchors are
    checked here: every linked file exists and every ``#anchor`` names a heading of it."""
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.is_file(), f"README links to a missing file: {link}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"README links to no heading: {link}"
