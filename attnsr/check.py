"""`attnsr check`: parity of every fused kernel against its float64 reference on this device.

Each case runs a kernel forward and backward on random inputs in the layouts the layers produce
(fused-qkv views, channels_last, odd sizes), and compares the output and every input gradient
with the plain PyTorch reference of ``attnsr.kernels.reference`` computed in float64, as
``‖out − ref‖ / ‖ref‖``. The bounds are the test suite's (``attnsr.tolerances``). On a machine
without CUDA the kernels run in Triton's CPU interpreter, which the caller must enable
(``TRITON_INTERPRET=1``) before triton is first imported; :func:`enable_interpreter_if_no_gpu` does.
"""

import math
import os
import time

import torch

from attnsr.tolerances import REL_TOL, rel_error


def enable_interpreter_if_no_gpu(device=None) -> None:
    """Run Triton kernels in the CPU interpreter when they will run on the CPU: no GPU here, or
    ``device`` ("cpu", a command's ``--device``) says the CPU on a machine that has one. Before
    triton's import."""
    if not torch.cuda.is_available() or (device is not None and str(device).split(":")[0] == "cpu"):
        os.environ.setdefault("TRITON_INTERPRET", "1")


def worst(errors) -> float:
    """The largest error, NaN if any is NaN (``max`` skips a NaN that is not first)."""
    errors = list(errors)
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


def errors_vs_float64(ref, leaves, out, got, grad) -> dict:
    """Relative errors of an op's output ``out`` and input gradients ``got`` (for upstream gradient
    ``grad``) against ``ref`` run on float64 copies of the op's ``leaves`` (the inputs as the op got
    them, so the errors are the op's own): {"output": e, "grad 0": e, ...}."""
    exact = [t.detach().double().requires_grad_() for t in leaves]
    expect = ref(*exact)
    want = torch.autograd.grad(expect, exact, grad.double())
    errors = {"output": rel_error(out, expect)}
    errors.update({f"grad {i}": rel_error(g, w) for i, (g, w) in enumerate(zip(got, want))})
    return errors


def _cases(device):
    """(name, dtypes, make inputs, kernel, reference) for every op of ``kernels``."""
    from attnsr import kernels as K
    from attnsr.kernels import reference as R

    def randn(*shape, gen):
        return torch.randn(*shape, generator=gen)

    def attention_fused(gen):
        return [randn(2, 3 * 24, 9, 11, gen=gen)]

    def attention_patches_cl(gen):
        return [randn(1, 3 * 32, 12, 10, gen=gen).contiguous(memory_format=torch.channels_last)]

    def sequence(gen):
        return [randn(1, 2, 100, 20, gen=gen), randn(1, 2, 70, 20, gen=gen), randn(1, 2, 70, 20, gen=gen)]

    def mlp(c, r, gen):
        h = max(1, c // r)
        return [randn(h, c, gen=gen) / c**0.5, randn(h, gen=gen), randn(c, h, gen=gen) / h**0.5, randn(c, gen=gen)]

    def channel(gen):
        return [randn(2, 19, 7, 9, gen=gen), *mlp(19, 4, gen)]

    def spatial(gen):
        return [randn(2, 5, 11, 13, gen=gen).contiguous(memory_format=torch.channels_last),
                randn(1, 2, 7, 7, gen=gen) / 7, randn(1, gen=gen)]

    def cbam(gen):
        return [randn(1, 18, 9, 7, gen=gen), *mlp(18, 4, gen), randn(1, 2, 5, 5, gen=gen) / 5, randn(1, gen=gen)]

    def fusion(gen):
        return [randn(3, 2, 6, 7, 5, gen=gen), randn(2, 3, gen=gen).softmax(-1)]

    yield ("image_attention fused qkv NCHW, C24", attention_fused,
           lambda t: K.image_attention(*t.split(24, 1)),
           lambda t: R.image_attention_ref(*t.split(24, 1), upcast=True))
    yield ("image_attention NHWC, heads 2, patch 2", attention_patches_cl,
           lambda t: K.image_attention(*t.split(32, 1), heads=2, patch_size=2),
           lambda t: R.image_attention_ref(*t.split(32, 1), heads=2, patch_size=2, upcast=True))
    yield ("flash_attention N100 M70 D20", sequence, K.flash_attention,
           lambda *t: R.flash_attention_ref(*t, upcast=True))
    def windows(gen):  # SwinIR's (B, H·W, 3C) qkv projection and its relative position bias table
        return [randn(2, 8 * 12, 3 * 20, gen=gen), randn(49, 2, gen=gen) * 0.5]

    def on_windows(op, **extra):  # the three maps split out of the projection, a shifted window of 4
        return lambda qkv, table: op(*qkv.view(2, 8, 12, 60).split(20, -1), window_size=4, shift_size=2, heads=2,
                                     bias_table=table, **extra)

    yield ("window_attention w4 shift 2, D10, bias", windows, on_windows(K.window_attention),
           on_windows(R.window_attention_ref, upcast=True))
    yield ("channel_gate avgmax, C19", channel, lambda *t: K.channel_gate(*t, pool="avgmax"),
           lambda *t: R.channel_gate_ref(*t, pool="avgmax", upcast=True))
    yield ("spatial_gate k7, NHWC", spatial, K.spatial_gate, lambda *t: R.spatial_gate_ref(*t, upcast=True))
    yield ("cbam_gate k5, C18", cbam, K.cbam_gate, lambda *t: R.cbam_gate_ref(*t, upcast=True))
    yield ("layer_fusion L3", fusion, K.layer_fusion, lambda *t: R.layer_fusion_ref(*t, upcast=True))


def parity_rows(device: torch.device, seed: int = 0) -> list:
    """One dict per (case, dtype): name, dtype, out error, worst gradient error, bound, ms, ok."""
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    rows = []
    for name, make, fn, ref in _cases(device):
        for dtype in dtypes:
            gen = torch.Generator().manual_seed(seed)
            leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in make(gen)]
            start = time.perf_counter()
            out = fn(*leaves)
            grad = torch.randn(out.shape, generator=gen).to(device=device, dtype=dtype)
            got = torch.autograd.grad(out, leaves, grad)
            if device.type == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - start) * 1e3
            errors = errors_vs_float64(ref, leaves, out, got, grad)
            err_out = errors.pop("output")
            err_grad = worst(errors.values())
            bound = REL_TOL[dtype]
            rows.append({"case": name, "dtype": str(dtype).replace("torch.", ""), "out": err_out,
                         "grads": err_grad, "bound": bound, "ms": ms,
                         "ok": err_out <= bound and err_grad <= bound})
    return rows


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"


def print_parity(device: torch.device) -> int:
    """Print the parity table; return the number of cases out of bounds."""
    print(f"attnsr parity check on {device_name(device)}: relative error vs float64 reference, "
          "forward and every gradient")
    header = f"{'case':<40} {'dtype':<9} {'out':>9} {'grads (worst)':>14} {'bound':>7} {'ms':>8}  ok"
    print(header)
    print("-" * len(header))
    rows = parity_rows(device)
    for r in rows:
        print(f"{r['case']:<40} {r['dtype']:<9} {r['out']:9.2e} {r['grads']:14.2e} {r['bound']:7.0e} "
              f"{r['ms']:8.1f}  {'yes' if r['ok'] else 'NO'}")
    failures = sum(not r["ok"] for r in rows)
    print("all within bounds" if not failures else f"{failures} case(s) out of bounds")
    return failures
