#!/usr/bin/env bash
# Lint, then the whole test suite (examples included). HYPOTHESIS_PROFILE=thorough for long runs.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
ruff check depgraph visualize tests examples benchmarks
python -m pytest -q -p no:cacheprovider --durations=25 "$@"
