"""Parity tests against the original BLIP code (PyPI blip-vit), which runs in its own venv.

`harness.py` is blipfast's side (its venv only); `original_env.py`, `run_original.py` and
`run_original_tasks_inference.py` run only under the reference venv's python, started as
`python -m tests.parity.run_original ...` from the repository root; the weight rule both sides
share is tests/helpers.py's `sharpen_` (plain torch).
"""
