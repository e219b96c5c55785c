#!/usr/bin/env bash
# Set up everything and run the whole test suite (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
SEGVOL_BROWSER=1 bash scripts/setup.sh
.venv/bin/ruff check segvol apps tests scripts
.venv/bin/ruff format --check segvol apps tests scripts
.venv/bin/python -m pytest -q -ra "$@"
