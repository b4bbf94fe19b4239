# Sourced by the scripts: which Python environment megapairs lives in.
# MEGAPAIRS_VENV if set; else an active virtualenv or conda environment (so a GPU machine's
# own environment, with its CUDA torch, is used as it is); else ./.venv.
MEGAPAIRS_ENV=${MEGAPAIRS_VENV:-${VIRTUAL_ENV:-${CONDA_PREFIX:-.venv}}}
