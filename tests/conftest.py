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
if ON_GPU:
    # PyTorch runs fp32 convolutions on cuDNN as TF32 by default (10-bit mantissa, ~1e-3 relative):
    # the tests hold fp32 results to fp32 tolerances against float64 references, and compare tiled
    # with untiled inference, so fp32 convolutions run in full fp32 here, as on the CPU. On an H200
    # the default failed a SelfAttention2d fp32 check (its qkv convolution) and tiled-vs-untiled
    # inference of a strided network. Tests of the TF32 paths turn it on themselves.
    torch.backends.cudnn.allow_tf32 = False


def needs_gpu(test):
    """Marks a test that only a CUDA GPU can run: skipped elsewhere, and marked ``gpu`` so that a
    GPU run can take these first (``pytest -m gpu tests``; benchmarks/run_gpu.sh does)."""
    return pytest.mark.gpu(pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")(test))


def error_line(capsys) -> str:
    """The one line a CLI command printed to stderr for bad input: ``attnsr: error: ...``, no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one clear line, no traceback
    assert err[0].startswith("attnsr: error: ")
    return err[0]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run first on a GPU machine: pytest -m gpu)")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
