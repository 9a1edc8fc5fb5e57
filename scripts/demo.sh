#!/usr/bin/env bash
# The embedded default, from a fresh clone: a venv with blipfast[train,dali], then a tiny BLIP
# trained under DeepSpeed on blipfast's synthetic shapes dataset and evaluated on its held-out
# split (image<->text recall@1 and a few captions).
#   bash scripts/demo.sh                 # 2 ranks on the CPU, or every GPU of the machine
#   bash scripts/demo.sh train.epochs=4  # extra key=value overrides go to train.py
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # CPU: exactly the locked environment the tests use (requirements/lock.txt).
  bash scripts/setup_venvs.sh main
elif ! "$VENV/bin/python" -c "import blipfast, deepspeed, nvidia.dali" 2>/dev/null; then
  # GPU: the lock's CPU torch (and the triton beside it) do not apply; everything else is held
  # to the lock's versions by a constraints file.
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
  "$VENV/bin/pip" install -q torch
  grep -v -E '^(#|torch==|triton==|nvidia-)' requirements/lock.txt > "$VENV/constraints.txt"
  # deepspeed ships as an sdist that requires torch: build it against the torch just installed
  # (build isolation would download another, multi-GB torch).
  "$VENV/bin/pip" install -q -c "$VENV/constraints.txt" --no-build-isolation "deepspeed==0.19.8"
  "$VENV/bin/pip" install -q -c "$VENV/constraints.txt" -e ".[train,dali]"
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  LAUNCH=("$VENV/bin/deepspeed")                 # all GPUs
else
  LAUNCH=("$VENV/bin/deepspeed" --num_gpus 2)    # 2 ranks on the CPU (gloo)
fi
exec "${LAUNCH[@]}" train.py --config configs/demo.yaml "$@"
