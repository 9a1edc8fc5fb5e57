#!/usr/bin/env bash
# Create the virtual environments blipfast's tests need, from nothing, exactly as locked:
#   .venv      blipfast itself (CPU torch 2.13, triton, transformers 5, deepspeed, DALI, test tools):
#              requirements/lock.txt
#   .venv-ref  the original BLIP code (PyPI blip-vit 0.0.3) with the versions it needs, used only
#              as the numerical reference of the parity tests (it cannot import beside transformers 5):
#              requirements/lock-ref.txt
#   .tri36     triton 3.6.0 alone (the GPU machine's version), put ahead of .venv's triton with
#              PYTHONPATH for the kernel tests' second lane (scripts/test.sh)
# Every install is --no-deps from a lock, so two fresh installs give the same versions; `pip check`
# proves the lock is complete. Regenerate the locks with scripts/lock.sh.
# Re-running is cheap: a stamp file records a finished install of the same lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TRITON_GPU=3.6.0   # the GPU machine's triton (ENVIRONMENT.md)

stamp() { sha1sum "$@" | sha1sum | cut -c1-12; }

MAIN_RECIPE="$(stamp requirements/lock.txt setup.py)"
if [ "$(cat .venv/.blipfast-stamp 2>/dev/null)" != "$MAIN_RECIPE" ]; then
  echo "[setup] building .venv from requirements/lock.txt"
  rm -rf .venv
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q --no-deps -r requirements/lock.txt
  .venv/bin/pip install -q --no-deps -e .
  .venv/bin/pip check
  echo "$MAIN_RECIPE" > .venv/.blipfast-stamp
fi

# `setup_venvs.sh main` (scripts/demo.sh) stops here: the demo needs only .venv.
[ "${1:-all}" = main ] && { echo "[setup] .venv ready"; exit 0; }

REF_RECIPE="$(stamp requirements/lock-ref.txt)"
if [ "$(cat .venv-ref/.blipfast-stamp 2>/dev/null)" != "$REF_RECIPE" ]; then
  echo "[setup] building .venv-ref from requirements/lock-ref.txt (the original BLIP code, for parity tests)"
  rm -rf .venv-ref
  "$PY" -m venv .venv-ref
  .venv-ref/bin/pip install -q --upgrade pip
  # blip-vit's setup.py imports pip, so it builds without isolation, after the rest is in.
  grep -v '^blip-vit==' requirements/lock-ref.txt > .venv-ref/lock-no-blip.txt
  .venv-ref/bin/pip install -q --no-deps -r .venv-ref/lock-no-blip.txt
  .venv-ref/bin/pip install -q --no-deps --no-build-isolation "$(grep '^blip-vit==' requirements/lock-ref.txt)"
  echo "$REF_RECIPE" > .venv-ref/.blipfast-stamp
fi

if [ "$(cat .tri36/.blipfast-stamp 2>/dev/null)" != "$TRITON_GPU" ]; then
  echo "[setup] installing triton $TRITON_GPU into .tri36 (the GPU machine's compiler, second kernel lane)"
  rm -rf .tri36
  .venv/bin/pip install -q --no-deps --target .tri36 "triton==$TRITON_GPU"
  echo "$TRITON_GPU" > .tri36/.blipfast-stamp
fi
echo "[setup] venvs ready"
