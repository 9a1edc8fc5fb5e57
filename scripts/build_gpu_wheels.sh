#!/usr/bin/env bash
# Build the wheels the GPU machine's image lacks into .whl/ (ignored by git), for the device
# tool's `carry: [".whl"]`. benchmarks/gpu_check.sh installs them with --no-index into /tmp/site
# and APPENDS that folder to PYTHONPATH: the image's own packages (torch, triton, numpy, ...)
# always win over anything carried.
#
#   bash scripts/build_gpu_wheels.sh                   # deepspeed + its missing dependencies + xformers
#   WITH_XFORMERS=0 bash scripts/build_gpu_wheels.sh   # without xformers 0.0.35 (3.2 MB, the attention peer)
#
# What the GPU image (python 3.12, torch 2.11, triton 3.6) lacks for `deepspeed train.py`:
# deepspeed itself (built here as a pure-Python wheel, DS_BUILD_OPS=0: its ops JIT-build on
# demand, and ZeRO-2 with torch's AdamW needs none), pydantic + pydantic-core (cp312 manylinux
# x86_64: a compiled wheel, downloaded for the image's Python, not this machine's), annotated-types,
# typing-inspection and hjson. It already has einops, msgpack, ninja, nvidia-ml-py, packaging,
# psutil, py-cpuinfo, tqdm and typing-extensions (/work/shared/ENVIRONMENT.md). The total, with
# everything else that travels (tracked + untracked-not-ignored files), must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
DS_VERSION=${DS_VERSION:-0.19.8}
mkdir -p "$DEST"
rm -f "$DEST"/*.whl

echo "[wheels] deepspeed $DS_VERSION (pure Python, DS_BUILD_OPS=0)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$DS_VERSION"

# deepspeed's requirements that the image lacks; versions pinned so the set is reproducible.
# pydantic-core must be exactly the version pydantic declares.
# 2.12.5 needs typing-extensions >= 4.14.1 (2.14 needs >= 4.16): the image's own typing-extensions
# wins (the carried folder is appended), so ask for the older floor
PYDANTIC=${PYDANTIC:-2.12.5}
PYDANTIC_CORE=${PYDANTIC_CORE:-}
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
fetch() { "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$DEST" "$@"; }
fetch_any() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$DEST" "$@"; }

echo "[wheels] pydantic $PYDANTIC, annotated-types, typing-inspection, hjson"
fetch_any "pydantic==$PYDANTIC" annotated-types typing-inspection hjson
if [ -z "$PYDANTIC_CORE" ]; then  # the exact pin from pydantic's metadata
    PYDANTIC_CORE=$(unzip -p "$DEST"/pydantic-"$PYDANTIC"-*.whl '*/METADATA' \
        | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p' | head -1)
fi
echo "[wheels] pydantic-core $PYDANTIC_CORE (cp312 manylinux x86_64)"
fetch "pydantic-core==$PYDANTIC_CORE"

if [ "${WITH_XFORMERS:-1}" = 1 ]; then
    echo "[wheels] xformers 0.0.35"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DEST" xformers==0.0.35
fi

# Size check: what the device tool sends is the tracked and untracked-not-ignored files plus .whl/.
wheels=$(du -sb "$DEST" | cut -f1)
tree=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -L -c %s 2>/dev/null || true) \
        | awk '{s += $1} END {print s + 0}')
total=$((wheels + tree))
limit=$((64 * 1024 * 1024))
ls -l "$DEST"
printf '[wheels] .whl/ %.1f MiB + working tree %.1f MiB = %.1f MiB (limit 64 MiB)\n' \
    "$(echo "$wheels / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)"
if [ "$total" -ge "$limit" ]; then
    echo "[wheels] ERROR: over the device tool's 64 MiB limit" >&2
    exit 1
fi
