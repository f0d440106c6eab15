#!/usr/bin/env bash
# Set up if needed, then lint, type-check and run the whole test suite (tiny models + the
# embedded model; annotations checked at run time by jaxtyping + beartype).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
