#!/usr/bin/env bash
# Install everything and run the whole test suite. This is the README's test command and CI's.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/test-deps.sh
. .venv/bin/activate
python -m pytest -q --durations=25 "$@"
