"""Accuracy bounds per dtype: the one table of the test suite (tests/tolerances.py) and of
``attnsr check``.

Accuracy is ‖out − ref‖ / ‖ref‖ against a float64 reference. The bounds are what a correct kernel
reaches with margin: fp32 in the interpreter is exact up to summation order; fp16 and bf16 are
bounded by rounding the inputs, the probabilities and the output to the storage type.
"""

import torch

REL_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}

# fp32 attention on a GPU, by the precision of its dot products (kernels/_runtime.py): 3×TF32 and
# exact fp32 are within fp32's rounding of the inputs; one tf32 product rounds operands to 10 bits.
# Under the interpreter every dot is exact and REL_TOL[torch.float32] applies.
FP32_PRECISION_TOL = {"tf32x3": 1e-5, "ieee": 1e-5, "tf32": 5e-3}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; the absolute error when the reference is zero."""
    out = out.detach().double()
    ref = ref.detach().double()
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    return num / denom if denom > 0 else num


# ``attnsr tune``: a launch candidate's outputs against the shipped setting's. A correct candidate
# differs only by summation order and roundings to the dtype ("tf32": fp32 with one tf32 product).
TUNE_AGREE = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-4, "tf32": 5e-3}
