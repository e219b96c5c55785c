#!/usr/bin/env bash
# Set up everything and run the whole test suite (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check segvol apps tests
.venv/bin/ruff format --check segvol apps tests
.venv/bin/python -m pytest -q -ra "$@"
