#!/usr/bin/env bash
# Set up if needed, then lint, type-check, build the docs and run the whole test suite (tiny models + the
# embedded model; annotations checked at run time by jaxtyping + beartype).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
# The docs (mkdocs.yml, docs/hooks/): built with warnings as errors, so a broken link, a missing
# reference or a public name without a docstring fails here; the site goes to a scratch folder.
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$site"
# Two pytest-xdist workers, one torch thread each (tests/conftest.py): the tiny-model tests are
# bound by Python, not arithmetic, so two workers halve the wall time on two cores.
# FACTSCOPE_TEST_WORKERS=0 runs in one process.
.venv/bin/python -m pytest -q -n "${FACTSCOPE_TEST_WORKERS:-2}" "$@"
