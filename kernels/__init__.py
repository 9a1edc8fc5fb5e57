"""blipfast.kernels: Triton kernels with host launchers and autograd Functions.

Knows nothing of the model. `reference` holds the plain-PyTorch definition of every op.
"""
from . import reference  # noqa: F401
