"""Test device selection: CUDA when present, else CPU with Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported, so this runs before any test module
imports the kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def needs_gpu(test):
    """Marks a test that only a CUDA GPU can run: skipped elsewhere, and marked ``gpu`` so that a
    GPU run can take these first (``pytest -m gpu tests``; benchmarks/run_gpu.sh does)."""
    return pytest.mark.gpu(pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")(test))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run first on a GPU machine: pytest -m gpu)")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
