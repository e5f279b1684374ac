"""`attnsr check` judges with the test suite's tolerance table, not a copy of it."""

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
