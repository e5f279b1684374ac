"""`attnsr check` judges with the test suite's tolerance table, not a copy of it."""

import os

import tolerances
import torch
from conftest import DEVICE

from attnsr import check


def test_check_and_tests_share_one_tolerance_table(monkeypatch):
    assert check.REL_TOL is tolerances.REL_TOL
    # a bound tightened in the one table tightens the check: its rows go out of bounds
    monkeypatch.setitem(tolerances.REL_TOL, torch.float32, 0.0)
    monkeypatch.setattr(check, "_cases", lambda device: [c for c in _real_cases(device) if "layer_fusion" in c[0]])
    rows = [r for r in check.parity_rows(DEVICE) if r["dtype"] == "float32"]
    assert rows and not any(r["ok"] for r in rows) and all(r["bound"] == 0.0 for r in rows)


_real_cases = check._cases


def test_cpu_device_runs_the_kernels_in_the_interpreter_on_a_gpu_machine(monkeypatch):
    """`attnsr check --device cpu` (and --device cpu for train, upscale, inpaint, demo) on a machine
    with a GPU: the kernels get CPU tensors, which only the interpreter runs (found on an H200, where
    the installed-wheel test's `check --device cpu` failed); on the GPU itself they compile."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for device, expect in ((None, None), ("cuda", None), ("cuda:1", None), ("cpu", "1")):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        check.enable_interpreter_if_no_gpu(device)
        assert os.environ.get("TRITON_INTERPRET") == expect, device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    check.enable_interpreter_if_no_gpu("cuda")  # no GPU: the CLI then says --device cuda is unavailable
    assert os.environ.get("TRITON_INTERPRET") == "1"


def test_a_nan_gradient_error_is_the_worst():
    """``max`` skips a NaN that is not first; a NaN gradient must fail the parity row."""
    assert check.worst([0.1, 0.2]) == 0.2
    assert all(check.worst(e) != check.worst(e) for e in ([0.1, float("nan")], [float("nan"), 0.1]))
