#!/usr/bin/env bash
# The GPU checks, prepared to run in one go on a lent GPU machine (H200), from the repo root:
#
#   bash bench/gpu_checks.sh                  # train, embed, knn -> ${OUT:-bench/out/gpu}/
#   bash bench/gpu_checks.sh embed knn        # only some steps (a rerun)
#   bash bench/gpu_checks.sh --dry-run        # the same plumbing on a CPU, tiny sizes
#   bash bench/gpu_checks.sh --fetch-wheels   # HERE, beforehand: wheels the GPU machine lacks
#
# Through the device tool: run(command="bash bench/gpu_checks.sh", carry=["bench/out/wheels"],
# timeout_s=600). The whole budget on the lent machine is ~15 minutes of device time,
# start-up (1-2 min) included, and at most 10 minutes per command, so each step has a
# timeout and sizes chosen to fit: train 200 s, embed 180 s, knn 180 s, all capped together
# at TOTAL_S=570 s (a late step gets what is left). Estimated (not measured) ~4-5 minutes
# in all, which leaves time to rerun one step while the machine is still warm.
#
#   train  bench_train_cuda.py: MMRet-CLIP ViT-B/16, batch 2048, gradient caching (chunk
#          256), bf16, 3 timed steps: queries/s and peak memory
#   embed  bench_embed_gpu.py: CLIP ViT-L/14 and DINOv2-B/14, 8192 JPEGs, batch 256, one
#          DataLoader worker per CPU: embed stage img/s vs forward only
#   knn    bench_knn.py engines: 1M x 768, k=20, every vector a query; the torch fp16 exact
#          engine (FAISS GPU rows too if faiss has GPU support; faiss-cpu has none)
#
# The machine (device KINDS.md, 2026-11) has Python 3.12, torch 2.11 (CUDA), transformers,
# accelerate, peft, pyarrow, but neither pydantic (megapairs needs it) nor faiss (bench_knn.py
# and megapairs.neighbours.search import it at module level). Wheels carried in $WHEELS
# (bench/out/wheels, ignored by git) are installed into /tmp/megapairs-site when the module is
# missing. Without faiss the knn step is skipped, with a message saying so.
# Idempotent: outputs are overwritten; scratch data (images, models, the 1M embeddings) lives
# in $WORK (/tmp/megapairs-gpu-checks) and is reused by a rerun on the same machine.
# Extra arguments per step: TRAIN_ARGS, EMBED_ARGS, KNN_ARGS (e.g. EMBED_ARGS="--images 4096").

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

OUT=${OUT:-bench/out/gpu}
WORK=${WORK:-/tmp/megapairs-gpu-checks}
WHEELS=${WHEELS:-bench/out/wheels}
SITE=/tmp/megapairs-site
TOTAL_S=${TOTAL_S:-570}
declare -A LIMIT=([train]=${TRAIN_S:-200} [embed]=${EMBED_S:-180} [knn]=${KNN_S:-180})
declare -A STATUS=() SECS=()
STEPS=()
DRY=0
START=$SECONDS

fetch_wheels() {
    # cp312 manylinux wheels of what the GPU image lacks, pinned to the versions tested here.
    mkdir -p "$WHEELS"
    "${PYTHON:-.venv/bin/python}" -m pip download -q --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" \
        faiss-cpu==1.15.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
        typing-inspection==0.4.5 typing-extensions==4.16.0
    ls -l "$WHEELS"
}

for arg in "$@"; do
    case $arg in
        --fetch-wheels) fetch_wheels; exit ;;
        --dry-run) DRY=1 ;;
        train | embed | knn) STEPS+=("$arg") ;;
        *) echo "unknown argument: $arg (steps: train embed knn; --dry-run, --fetch-wheels)" >&2
           exit 2 ;;
    esac
done
((${#STEPS[@]})) || STEPS=(train embed knn)
PYTHON=${PYTHON:-python3}

have() { "$PYTHON" -c "import $1" 2>/dev/null; }

install_missing() {
    # The carried wheels whose modules this Python lacks (the pydantic set goes together).
    local wanted=()
    have faiss || wanted+=(faiss_cpu)
    have pydantic || wanted+=(pydantic pydantic_core annotated_types typing_inspection
        typing_extensions)
    local files=() name
    for name in "${wanted[@]}"; do
        compgen -G "$WHEELS/$name-*.whl" >/dev/null && files+=("$WHEELS/$name"-*.whl)
    done
    echo "missing here: ${wanted[*]:-nothing}; wheels to install: ${#files[@]}"
    ((${#files[@]})) || return 0
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${files[@]}"
}

environment() {
    date -u '+%Y-%m-%d %H:%M:%S UTC'
    echo "command: bash bench/gpu_checks.sh $*"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    else
        echo "no nvidia-smi"
    fi
    echo "CPUs: $(nproc); python: $("$PYTHON" -V 2>&1) at $(command -v "$PYTHON")"
    "$PYTHON" -c 'import torch, transformers as t; print("torch", torch.__version__, "CUDA",
        torch.version.cuda, "available", torch.cuda.is_available(), "transformers", t.__version__)'
    "$PYTHON" -c 'import faiss; print("faiss", faiss.__version__)' 2>&1 | tail -n 1
    "$PYTHON" -c 'import pydantic; print("pydantic", pydantic.VERSION)' 2>&1 | tail -n 1
}

step_command() {  # the command line of step $1 (GPU sizes, or tiny CPU ones with --dry-run)
    case $1:$DRY in
        train:0) echo "bench/bench_train_cuda.py --models b16 --batch 2048 ${TRAIN_ARGS:-}" ;;
        train:1) echo "bench/bench_train_cuda.py --dry-run ${TRAIN_ARGS:-}" ;;
        embed:0) echo "bench/bench_embed_gpu.py --workdir $WORK/embed --results $OUT/embed.md \
${EMBED_ARGS:-}" ;;
        embed:1) echo "bench/bench_embed_gpu.py --dry-run --workdir $WORK/embed-dry \
--results $OUT/embed.md ${EMBED_ARGS:-}" ;;
        knn:0) echo "bench/bench_knn.py engines --device cuda --n 1000000 --out $WORK/knn \
--json $OUT/knn.json ${KNN_ARGS:-}" ;;
        knn:1) echo "bench/bench_knn.py engines --device cpu --n 20000 --queries 2000 \
--out $WORK/knn-dry --json $OUT/knn.json ${KNN_ARGS:-}" ;;
    esac
}

run_step() {  # run step $1 under its timeout (never past TOTAL_S); record how it ended
    local name=$1 limit=${LIMIT[$1]} left rc started
    left=$((TOTAL_S - (SECONDS - START) - 5))
    ((limit > left)) && limit=$left
    if ((limit < 30)); then
        STATUS[$name]="skipped: only ${left}s of TOTAL_S=${TOTAL_S}s left"
        return
    fi
    if [[ $name == knn ]] && ! have faiss; then
        STATUS[$name]="skipped: faiss not importable (bench_knn.py and megapairs import it);"
        STATUS[$name]+=" run --fetch-wheels here and carry bench/out/wheels"
        return
    fi
    local command
    read -r -a command <<<"$(step_command "$name")"
    echo "== $name (timeout ${limit}s): python ${command[*]}"
    started=$SECONDS
    PYTHONUNBUFFERED=1 timeout --kill-after=10 "$limit" "$PYTHON" "${command[@]}" \
        >"$OUT/$name.log" 2>&1
    rc=$?
    SECS[$name]=$((SECONDS - started))
    case $rc in
        0) STATUS[$name]=ok ;;
        124 | 137) STATUS[$name]="timed out after ${limit}s" ;;
        *) STATUS[$name]="failed (exit $rc)" ;;
    esac
    echo "   ${STATUS[$name]} in ${SECS[$name]}s"
}

report() {  # each step's result table (or its log's tail), then the summary table last
    local name
    echo
    echo "# GPU checks ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    sed 's/^/    /' "$OUT/env.txt"
    for name in "${STEPS[@]}"; do
        echo
        echo "## $name: ${STATUS[$name]}"
        [[ -f $OUT/$name.log ]] || continue
        echo
        if [[ ${STATUS[$name]} == ok ]]; then
            grep -E '^- (date|device|encoder|command):' "$OUT/$name.log"
            echo
            grep '^|' "$OUT/$name.log"
        else
            tail -n 15 "$OUT/$name.log"
        fi
    done
    echo
    echo "## Summary ($((SECONDS - START)) s in all; outputs in $OUT)"
    echo
    echo "| step | status | seconds | log |"
    echo "|---|---|---:|---|"
    for name in "${STEPS[@]}"; do
        echo "| $name | ${STATUS[$name]} | ${SECS[$name]:--} | $OUT/$name.log |"
    done
}

mkdir -p "$OUT" "$WORK"
rm -f "$OUT"/{env.txt,summary.md,train.log,embed.log,embed.md,knn.log,knn.json}
install_missing
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
environment "$@" >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
have megapairs.encoders.stage || "$PYTHON" -c 'import megapairs.encoders.stage' 2>&1 | tail -n 3
for name in "${STEPS[@]}"; do
    run_step "$name"
done
report | tee "$OUT/summary.md"
