"""Parity harness against the original BLIP code (PyPI blip-vit), which runs in its own venv.

Files here are imported by both sides: `sharp_init.py` is plain torch; `original_env.py` and
`run_original.py` run only under the reference venv's python; `harness.py` only in blipfast's.
"""
