"""blipfast.kernels: Triton kernels with host launchers and autograd Functions.

Knows nothing of the model. `reference` holds the plain-PyTorch definition of every op.
`attention` is the fused attention function (its module, `blipfast/kernels/attention.py`, is reachable
through `importlib.import_module("blipfast.kernels.attention")`).
"""
from . import reference  # noqa: F401
from .attention import attention  # noqa: F401
