"""Test set-up: without a GPU, Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before triton is imported, so it is set here, first thing.
"""
import os

try:
    import torch

    _gpu = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _gpu = False
if not _gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads real model weights or runs long")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: the models in the model tests are small, and on a shared,
    busy CPU OpenMP threads waiting for each other make a forward pass up to 20x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def device():
    return "cuda" if _gpu else "cpu"


requires_gpu = pytest.mark.skipif(not _gpu, reason="needs a CUDA GPU")
