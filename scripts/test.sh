#!/usr/bin/env bash
# Install everything the tests need (the locked venvs, see setup_venvs.sh) and run the whole CPU
# suite, then the kernel tests a second time under triton 3.6.0, the GPU machine's compiler.
# Triton kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py when there is no GPU);
# parity tests run the original BLIP code from .venv-ref. No re-runs: a first-call failure fails.
set -euo pipefail
cd "$(dirname "$0")/.."

# Fresh venvs take ~9.5 GB (.venv-ref holds a CUDA torch: the original code needs torchvision) and
# a run writes ~1-3 GB of temp files; a full disk fails late and cryptically, so say it up front.
free_gb() { df -Pk "$1" | awk 'NR==2 {printf "%d", $4 / 1048576}'; }
echo "[test] free disk: $(free_gb .) GB here, $(free_gb "${TMPDIR:-/tmp}") GB in ${TMPDIR:-/tmp}"
if [ "$(free_gb .)" -lt 14 ] && [ ! -d .venv-ref ]; then
  echo "[test] WARNING: under 14 GB free; building the venvs and running the suite may fill the disk"
fi
bash scripts/setup_venvs.sh

# The tested environment is the lock, exactly.
if ! diff <(grep -v '^#' requirements/lock.txt | LC_ALL=C sort -f) \
          <(.venv/bin/pip freeze --all --exclude blipfast 2>/dev/null | LC_ALL=C sort -f); then
  echo "[test] .venv differs from requirements/lock.txt (lines above); rebuild it: rm -rf .venv && bash scripts/setup_venvs.sh"
  exit 1
fi

echo "[test] import layers (lint-imports, the contract in .importlinter)"
.venv/bin/lint-imports

echo "[test] lane 1: the whole suite, locked triton $(.venv/bin/python -c 'import triton; print(triton.__version__)')"
.venv/bin/python -m pytest -q "$@"

echo "[test] lane 2: kernel tests (-m kernels) under triton $(PYTHONPATH=.tri36 .venv/bin/python -c 'import triton; print(triton.__version__)') from .tri36"
PYTHONPATH=$PWD/.tri36 .venv/bin/python -m pytest -q -m kernels -p no:cacheprovider "$@"
