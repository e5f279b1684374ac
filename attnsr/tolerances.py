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
