#!/usr/bin/env bash
# The README's test command: set up (once) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. scripts/env.sh
exec "$MEGAPAIRS_ENV/bin/python" -m pytest "$@"
