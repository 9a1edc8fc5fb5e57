"""Shared test set-up.

On a machine without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET must be
set before triton is first imported (triton.jit reads it when a kernel is defined), so it is
set here, before any test module imports blipfast.kernels.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_report_header(config):
    import triton

    return (f"blipfast test versions: torch {torch.__version__}, triton {triton.__version__} "
            f"({os.path.dirname(triton.__file__)}), TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def tiny_config():
    from blipfast import BlipConfig

    return BlipConfig.from_yaml(os.path.join(REPO, "configs", "blip_tiny.yaml"))
