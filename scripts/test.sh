#!/usr/bin/env bash
# Set up if needed, then lint and run the whole test suite (tiny models + the embedded model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
