#!/usr/bin/env bash
# Install everything the tests need (two venvs, see setup_venvs.sh) and run the whole CPU suite.
# Triton kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py when there is no GPU);
# parity tests run the original BLIP code from .venv-ref.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venvs.sh
exec .venv/bin/python -m pytest -q "$@"
