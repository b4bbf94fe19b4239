#!/usr/bin/env bash
# The README's main job: set up (once) and run the offline demo end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. scripts/env.sh
exec "$MEGAPAIRS_ENV/bin/megapairs" demo "$@"
