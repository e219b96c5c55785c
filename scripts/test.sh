#!/usr/bin/env bash
# Set up everything and run the whole test suite (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
SEGVOL_BROWSER=1 bash scripts/setup.sh
.venv/bin/ruff check segvol apps tests scripts
.venv/bin/ruff format --check segvol apps tests scripts
# in a random order (pytest-randomly): every test must pass alone and after any other.
# SEGVOL_TEST_SEED=N replays an order; the seed is printed first.
seed=${SEGVOL_TEST_SEED:-$(( (RANDOM << 15) | RANDOM ))}
echo "test order: pytest-randomly seed $seed (replay: SEGVOL_TEST_SEED=$seed bash scripts/test.sh)"
.venv/bin/python -m pytest -q -ra -p randomly --randomly-seed="$seed" "$@"
