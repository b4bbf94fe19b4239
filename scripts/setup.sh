#!/usr/bin/env bash
# Install megapairs with what its demo and tests need; idempotent.
#
# The environment is the active virtualenv/conda environment if there is one, else ./.venv
# (see scripts/env.sh). torch is installed first and pinned (a bare `torch` requirement
# would pull a multi-GB CUDA build on a machine without one); a torch the environment
# already has is kept, and a new .venv sees the system's site-packages when python3
# already imports a torch (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

VENV=$MEGAPAIRS_ENV
TORCH_PIN=${MEGAPAIRS_TORCH:-torch==2.13.0}
STAMP="$VENV/.megapairs-setup"
WANT=$(cat pyproject.toml scripts/setup.sh scripts/env.sh | sha256sum | cut -c1-16)

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    if python3 -c "import torch" 2>/dev/null; then
        echo "setup: keeping the installed torch $(python3 -c 'import torch; print(torch.__version__)')"
        python3 -m venv --system-site-packages "$VENV"
    else
        python3 -m venv "$VENV"
    fi
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: installing $TORCH_PIN"
    "$PY" -m pip install --quiet "$TORCH_PIN"
fi
echo "setup: installing megapairs with the demo, explore and test extras"
"$PY" -m pip install --quiet -e ".[demo,explore,test,dev]"
if "$PY" -c "import torchvision" 2>/dev/null && ! "$PY" -c "import torchvision.ops" 2>/dev/null; then
    echo "setup: warning: a torchvision that does not match torch is installed; transformers" \
        "will fail to import it. Remove it: $PY -m pip uninstall -y torchvision" >&2
fi
echo "$WANT" > "$STAMP"
