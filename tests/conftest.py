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

needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
