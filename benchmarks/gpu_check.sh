#!/usr/bin/env bash
# Every GPU check of blipfast in one command (see benchmarks/README.md):
#   1. installs the wheels carried in .whl/ (no network) into /tmp/site and puts them on PYTHONPATH;
#   2. makes blipfast importable (editable install without dependencies, else a staged copy);
#   3. runs benchmarks/run_all.py: pytest -m gpu, the kernel microbenchmarks, the end-to-end
#      benchmark, each on a time budget, then prints the summary table last and copies
#      rows.jsonl, summary.txt and logs.tar.gz to $OUT when it is set.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine (about 8 minutes on an H100)
#   bash benchmarks/gpu_check.sh --dry-run   # the same on the CPU at tiny sizes (BLIPFAST_BENCH_DRY_RUN=1)
#
# PYTHON picks the interpreter (default python3, the one with torch on the GPU machine).
set -u -o pipefail
export BLIPFAST_T0=${BLIPFAST_T0:-$(date +%s)}  # run_all.py's time budget counts the set-up too
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
DRY=${BLIPFAST_BENCH_DRY_RUN:-0}
ARGS=()
for a in "$@"; do
    case "$a" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) ARGS+=("$a") ;;
    esac
done
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export BLIPFAST_BENCH_DRY_RUN=$DRY
if [ "$DRY" = 1 ]; then
    ARGS+=(--dry-run)
    # Timings on the CPU mean nothing: one thread each keeps a shared machine responsive.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    echo "[gpu_check] DRY RUN: CPU only, tiny sizes; no wheel is installed, no GPU is touched"
fi

# 1. carried wheels (never the network)
WHEELS=$(ls .whl/*.whl 2>/dev/null || true)
if [ -z "$WHEELS" ]; then
    echo "[gpu_check] no wheels carried in .whl/: nothing to install"
elif [ "$DRY" = 1 ]; then
    echo "[gpu_check] dry-run: would install carried wheels:" $WHEELS
else
    echo "[gpu_check] installing carried wheels into /tmp/site:" $WHEELS
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        export BLIPFAST_WHEELS=$(for w in $WHEELS; do basename "$w"; done | tr '\n' ' ')
    else
        echo "[gpu_check] WARNING: installing the carried wheels failed; going on without them"
    fi
fi

# 2. blipfast importable straight from the source tree (kernels live in blipfast/kernels)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import blipfast.kernels" || echo "[gpu_check] WARNING: blipfast is not importable"

# 3. the stages and the summary (run_all.py keeps going past failing stages)
"$PY" benchmarks/run_all.py "${ARGS[@]}"
rc=$?
if [ $rc -ne 0 ] && [ -n "${OUT:-}" ] && [ ! -e "$OUT/summary.txt" ]; then
    echo "[gpu_check] run_all.py exited $rc without writing to \$OUT; copying its logs"
    tar czf "$OUT/logs.tar.gz" -C "${TMPDIR:-/tmp}" blipfast-bench 2>/dev/null || true
fi
exit $rc
