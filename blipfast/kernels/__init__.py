"""blipfast.kernels: Triton kernels with host launchers and autograd Functions.

Knows nothing of the model. `reference` holds the plain-PyTorch definition of every op.
`attention` is the fused attention function and `varlen_attention` its sibling for packed
sequences (their module, `blipfast/kernels/attention.py`, is reachable through
`importlib.import_module("blipfast.kernels.attention")`).
"""
from . import reference  # noqa: F401
from .attention import attention, varlen_attention  # noqa: F401
