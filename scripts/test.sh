#!/usr/bin/env bash
# Install everything the tests need (two venvs, see setup_venvs.sh) and run the whole CPU suite.
# Triton kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py when there is no GPU);
# parity tests run the original BLIP code from .venv-ref.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venvs.sh
# Warm-up: on this CPU machine, the first test process after a fresh venv was built repeatedly got
# MemoryError('std::bad_alloc') from the dispatcher on its first blipfast::flash_attention_fwd call
# (later processes pass; cause not found, see the issue notes). One throw-away call absorbs it;
# its outcome is only reported: the suite below is what passes or fails.
TRITON_INTERPRET=1 .venv/bin/python - <<'PY' || echo "[setup] attention warm-up call failed (see the comment in scripts/test.sh)"
import torch
from blipfast.kernels import attention
q = torch.randn(1, 1, 4, 16)
attention(q, q, q)
print("[setup] attention warm-up call ok")
PY
exec .venv/bin/python -m pytest -q "$@"
