#!/usr/bin/env bash
# Every GPU check of blipfast in one command (see benchmarks/README.md):
#   1. installs the wheels carried in .whl/ (no network) into /tmp/site and APPENDS it to sys.path
#      (a .pth file, after the image's site-packages): the image's own packages always come first;
#   2. makes blipfast importable from the source tree (the repository root first on PYTHONPATH);
#   3. runs benchmarks/run_all.py: compile every kernel up front, then GPU parity tests, the
#      end-to-end benchmark, the microbenchmarks and the real trainer, under one hard deadline
#      (--deadline-s, default 450 s from this script's start), copying rows.jsonl, summary.txt and
#      logs.tar.gz to $OUT after every stage; the summary table is printed last.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine (450 s; the device call: 480 s)
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
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
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
        # APPENDED to sys.path, after every site-packages folder of the image: a .pth file in the
        # last writable site folder (site.py appends its lines after that folder). PYTHONPATH
        # would put /tmp/site AHEAD of the image's packages, so it is only the fallback.
        if PTH=$("$PY" - <<'PYEOF'
import os, site, sys
for d in reversed([d for d in site.getsitepackages() if os.path.isdir(d)]):
    try:
        with open(os.path.join(d, "zzz_blipfast_carried.pth"), "w") as f:
            f.write("/tmp/site\n")
        print(d)
        break
    except OSError:
        continue
else:
    sys.exit(1)
PYEOF
        ); then
            echo "[gpu_check] carried wheels appended to sys.path by $PTH/zzz_blipfast_carried.pth"
        else
            echo "[gpu_check] WARNING: no writable site folder; appending /tmp/site to PYTHONPATH (ahead of site-packages)"
            export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/site
        fi
        export PATH=$PATH:/tmp/site/bin
        export BLIPFAST_WHEELS=$(for w in $WHEELS; do basename "$w"; done | tr '\n' ' ')
        "$PY" -c "import sys, torch; print('[gpu_check] torch from', torch.__file__); print('[gpu_check] sys.path tail:', sys.path[-3:])"
    else
        echo "[gpu_check] WARNING: installing the carried wheels failed; going on without them"
    fi
fi

# 2. blipfast importable straight from the source tree (kernels live in blipfast/kernels); the
#    deepspeed ranks of the trainer stage inherit PYTHONPATH
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
echo "[gpu_check] PYTHONPATH=$PYTHONPATH"
"$PY" -c "import blipfast.kernels" || echo "[gpu_check] WARNING: blipfast is not importable"

# 3. the stages and the summary (run_all.py keeps going past failing stages)
"$PY" benchmarks/run_all.py "${ARGS[@]}"
rc=$?
if [ $rc -ne 0 ] && [ -n "${OUT:-}" ] && [ ! -e "$OUT/summary.txt" ]; then
    echo "[gpu_check] run_all.py exited $rc without writing to \$OUT; copying its logs"
    tar czf "$OUT/logs.tar.gz" -C "${TMPDIR:-/tmp}" blipfast-bench 2>/dev/null || true
fi
exit $rc
