"""One table of tolerances per dtype and one comparison helper for every test.

Accuracy is measured as ‖out − ref‖ / ‖ref‖ against a float64 reference. The table, REL_TOL, lives
in attnsr.tolerances (the bounds and why they are what they are), so that ``attnsr check`` applies
the same values; it is re-exported here for the tests.
"""

import torch

from attnsr.tolerances import FP32_PRECISION_TOL, REL_TOL, rel_error

__all__ = ["FP32_PRECISION_TOL", "REL_TOL", "assert_close_rel", "rel_error"]


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output", tol=None):
    """Relative L2 error below the dtype's tolerance; on failure say where the worst element is."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    tol = REL_TOL[dtype] if tol is None else tol
    assert torch.isfinite(out).all(), f"{what}: {(~torch.isfinite(out)).sum().item()} non-finite elements"
    err = rel_error(out, ref)
    if not err <= tol:
        diff = (out.detach().double() - ref.detach().double()).abs()
        idx = int(diff.argmax())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), diff.shape))
        bad = int((diff > tol * ref.detach().double().abs().max()).sum())
        raise AssertionError(
            f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype}); {bad} of {diff.numel()} elements off; "
            f"worst at {where}: got {out.reshape(-1)[idx].item():.6g}, expected {ref.reshape(-1)[idx].item():.6g}"
        )
    return err
