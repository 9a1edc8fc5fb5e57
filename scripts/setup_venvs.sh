#!/usr/bin/env bash
# Create the two virtual environments blipfast's tests need, from nothing:
#   .venv      blipfast itself (CPU torch 2.13, triton, transformers 5, deepspeed, DALI, test tools)
#   .venv-ref  the original BLIP code (PyPI blip-vit 0.0.3) with the versions it needs, used only
#              as the numerical reference of the parity tests (it cannot import beside transformers 5).
# Re-running is cheap: a stamp file records a finished install of the same recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

MAIN_RECIPE="torch==2.13.0 | .[train,dali,eval,test] | $(sha1sum setup.py | cut -c1-12)"
if [ "$(cat .venv/.blipfast-stamp 2>/dev/null)" != "$MAIN_RECIPE" ]; then
  echo "[setup] building .venv (blipfast + CPU torch 2.13, deepspeed, DALI)"
  rm -rf .venv
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  # torch first and pinned: a bare 'torch' requirement would pull a multi-GB CUDA build.
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e ".[train,dali,eval,test]"
  echo "$MAIN_RECIPE" > .venv/.blipfast-stamp
fi

REF_RECIPE="torch==2.14.1 torchvision==0.29.1 transformers==4.46.3 timm==0.4.12 blip-vit==0.0.3"
if [ "$(cat .venv-ref/.blipfast-stamp 2>/dev/null)" != "$REF_RECIPE" ]; then
  echo "[setup] building .venv-ref (the original BLIP code, for parity tests)"
  rm -rf .venv-ref
  "$PY" -m venv .venv-ref
  .venv-ref/bin/pip install -q --upgrade pip
  .venv-ref/bin/pip install -q torch==2.14.1 torchvision==0.29.1 transformers==4.46.3 fairscale "setuptools<81" numpy
  # timm 0.4.12 would drag in a newer torchvision; blip-vit's setup.py imports pip.
  .venv-ref/bin/pip install -q --no-deps timm==0.4.12
  .venv-ref/bin/pip install -q --no-deps --no-build-isolation blip-vit==0.0.3
  echo "$REF_RECIPE" > .venv-ref/.blipfast-stamp
fi
# triton 3.6.0 (the GPU machine's version) beside the locked one, for the static kernel audit
# (tests/test_kernel_audit.py compiles every kernel for sm_90 under both; no GPU needed).
T36_RECIPE="triton==3.6.0"
if [ "$(cat .triton36/.blipfast-stamp 2>/dev/null)" != "$T36_RECIPE" ]; then
  echo "[setup] installing triton 3.6.0 into .triton36 (kernel audit)"
  rm -rf .triton36
  .venv/bin/pip install -q --no-deps --target .triton36 triton==3.6.0
  echo "$T36_RECIPE" > .triton36/.blipfast-stamp
fi
echo "[setup] venvs ready"
