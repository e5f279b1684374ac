"""`make demo`: the main job as far as it is built.

For now: a parity check of the fused attention kernels against the float64 PyTorch reference on
this machine's device (CUDA when present, else CPU with Triton's interpreter), forward and every
gradient, printed as a table.

    python -m attnsr.demo
"""

import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

from kernels import flash_attention, image_attention
from kernels.reference import flash_attention_ref, image_attention_ref

# Accuracy bounds per dtype for ‖out − ref‖ / ‖ref‖ (the tests' table).
BOUND = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _cases(device):
    """(name, dtype, tensors, kernel fn, reference fn): maps in the layouts the layers produce."""
    dtypes = [torch.float32, torch.float16]
    if device.type == "cuda":
        dtypes.append(torch.bfloat16)
    for dtype in dtypes:
        qkv = torch.randn(2, 3 * 32, 12, 12, device=device).to(dtype)
        yield ("fused qkv NCHW, C32 h1 p1", dtype, [qkv], lambda t: image_attention(*t.split(32, 1)),
               lambda t: image_attention_ref(*t.split(32, 1), upcast=True))
        qkv_cl = qkv.contiguous(memory_format=torch.channels_last)
        yield ("fused qkv NHWC, C32 h2 p2", dtype, [qkv_cl],
               lambda t: image_attention(*t.split(32, 1), heads=2, patch_size=2),
               lambda t: image_attention_ref(*t.split(32, 1), heads=2, patch_size=2, upcast=True))
        q, k, v = (torch.randn(1, 2, 100, 20, device=device).to(dtype) for _ in range(3))
        yield ("sequence B1 H2 N100 D20", dtype, [q, k, v], flash_attention,
               lambda *t: flash_attention_ref(*t, upcast=True))


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"attnsr parity check on {where}: relative error vs float64 reference, forward and gradients")
    header = f"{'case':<28} {'dtype':<9} {'out':>9} {'grads (worst)':>14} {'bound':>8} {'ms':>8}  ok"
    print(header)
    print("-" * len(header))
    torch.manual_seed(0)
    failures = 0
    for name, dtype, tensors, fn, ref in _cases(device):
        leaves = [t.detach().requires_grad_() for t in tensors]
        start = time.perf_counter()
        out = fn(*leaves)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, grad)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        expect = ref(*leaves)
        want = torch.autograd.grad(expect, leaves, grad.double())
        err_out = _rel(out, expect)
        err_grad = max(_rel(g, w) for g, w in zip(got, want))
        ok = err_out <= BOUND[dtype] and err_grad <= BOUND[dtype]
        failures += not ok
        dname = str(dtype).replace("torch.", "")
        print(f"{name:<28} {dname:<9} {err_out:9.2e} {err_grad:14.2e} {BOUND[dtype]:8.0e} {ms:8.1f}  "
              f"{'yes' if ok else 'NO'}")
    print("all within bounds" if not failures else f"{failures} case(s) out of bounds")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
