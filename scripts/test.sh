#!/usr/bin/env bash
# The README's test command: set up (once) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${MEGAPAIRS_VENV:-.venv}/bin/python" -m pytest "$@"
