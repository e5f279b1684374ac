"""Host cost per call: what an op costs before the GPU starts, beside PyTorch's SDPA in the same run.

    python -m benchmarks.host [--rounds 7] [--calls 200] [--out PATH.json]

How. On a machine without a GPU, Triton's JIT compiles each kernel for an sm_90 target (a stand-in
driver, as the compile report does) and then takes the real launch path of every call: argument
binding, specialisation key, cache lookup, launch metadata; only the final launcher call, which
would hand the kernel to the CUDA driver, is replaced by a counter. So the time of one call is
everything the op does on the host: validation, dispatch, autograd, allocation, the ATen ops
around the kernels and the Triton launches, with tiny CPU tensors so that no ATen op costs more
than its dispatch. SDPA's forward and backward run on CPU tensors of the same tiny shape, fed
from one qkv projection as its users do (timm's reshape, permute, unbind), without bias or mask: its
host path plus a few microseconds of arithmetic, a conservative baseline. The ``torch`` backend of
attnsr (SDPA on 4-D tensors, window partition, bias and mask as a float mask) is timed beside it:
what the fused op replaces.

The providers of a case run round-robin: each round times ``calls`` back-to-back calls of every
provider in turn, so neither runs with caches the other has not got, and a busy moment hits both;
a provider's figure is the least-disturbed round (its minimum). Launches per call are counted;
ATen ops per call are the profiler's top-level ATen events (not nested in another ATen op).

On a GPU the same rows are measured as wall time per call with the kernels running, which is the
host cost only where the GPU keeps up (tiny shapes).
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

def _noop_launch(*args, **kwargs):
    """What a launch does when bound and not run: nothing."""


@contextlib.contextmanager
def launches_bound_not_run(arch: int = 90):
    """Inside the block, Triton kernels compile for sm_<arch> and every launch goes through the JIT's
    run path up to the driver call, which does nothing. CPU tensors are accepted."""
    from triton.compiler.compiler import CompiledKernel

    from attnsr.kernels import _runtime
    from attnsr.kernels.compile_report import _StandInDriver
    from triton.runtime import driver

    if _runtime.interpreting():
        raise RuntimeError("benchmarks.host: TRITON_INTERPRET is set; run it with TRITON_INTERPRET unset")
    def bind_not_load(self):  # what loading the cubin would set, with a counting launcher
        if self._run is None:
            self._run, self.function, self.module, self._module_pid = _noop_launch, 0, None, None

    previous = driver._active
    init_handles = CompiledKernel._init_handles
    driver.set_active(_StandInDriver(arch))
    CompiledKernel._init_handles = bind_not_load
    _runtime.BIND_ONLY[0] = True
    try:
        yield
    finally:
        _runtime.BIND_ONLY[0] = False
        CompiledKernel._init_handles = init_handles
        driver._active = previous


# ----------------------------------------------------------------------------------------------
# Cases: each provider is () -> None, one forward and backward
# ----------------------------------------------------------------------------------------------


def _sdpa_from_fused(tokens: int, channels: int, heads: int, dtype, device, batch: int = 1):
    """SDPA as its users feed it from one qkv projection (timm's Attention): (B, N, 3C) reshaped,
    permuted and unbound into (B, heads, N, d) views."""
    qkv = torch.randn(batch, tokens, 3 * channels, dtype=dtype, device=device, requires_grad=True)
    d = channels // heads

    def sdpa():
        q, k, v = qkv.reshape(batch, tokens, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    return sdpa


def _image_case(dtype, device, channels=32, size=8, heads=1):
    """q, k, v split out of one fused qkv map (SelfAttention2d's layout); SDPA on as many tokens."""
    from attnsr import backends, kernels

    qkv = torch.randn(1, 3 * channels, size, size, dtype=dtype, device=device, requires_grad=True)

    def fused():  # the packed op SelfAttention2d calls: qkv's gradient as one buffer
        kernels.image_attention_qkv(qkv, heads=heads).sum().backward()

    def fused_views():  # the op on the three views: autograd concatenates their gradients
        q, k, v = qkv.split(channels, 1)
        kernels.image_attention(q, k, v, heads=heads).sum().backward()

    def torch_backend():
        q, k, v = qkv.split(channels, 1)
        backends.image_attention(q, k, v, heads=heads, backend="torch").sum().backward()

    return ({"fused": fused, "fused_views": fused_views,
             "sdpa": _sdpa_from_fused(size * size, channels, heads, dtype, device), "torch": torch_backend},
            dict(op="image_attention", shape=f"1x{channels}x{size}x{size} h{heads}"))


def _window_case(dtype, device, channels=32, size=8, window=4, heads=2, shift=2):
    """SwinIR's layout: (B, H·W, 3C) qkv viewed as (B, H, W, 3C) and split; bias table; shifted.
    SDPA on the same windows (B·nW sequences of Wh·Ww tokens) without bias or mask."""
    from attnsr import backends, kernels

    qkv = torch.randn(1, size * size, 3 * channels, dtype=dtype, device=device, requires_grad=True)
    table = torch.randn((2 * window - 1) ** 2, heads, dtype=torch.float32, device=device, requires_grad=True)
    args = dict(window_size=window, shift_size=shift, heads=heads, bias_table=table)

    def fused():  # the packed op the swapped Swin layers call
        kernels.window_attention_qkv(qkv.view(1, size, size, 3 * channels), **args).sum().backward()

    def fused_views():
        q, k, v = qkv.view(1, size, size, 3 * channels).split(channels, -1)
        kernels.window_attention(q, k, v, **args).sum().backward()

    def torch_backend():
        q, k, v = qkv.view(1, size, size, 3 * channels).split(channels, -1)
        backends.window_attention(q, k, v, **args, backend="torch").sum().backward()

    sdpa = _sdpa_from_fused(window * window, channels, heads, dtype, device, batch=(size // window) ** 2)
    return ({"fused": fused, "fused_views": fused_views, "sdpa": sdpa, "torch": torch_backend},
            dict(op="window_attention", shape=f"1x{size}x{size}x{channels} w{window} s{shift} h{heads}"))


CASES = {"image_attention": _image_case, "window_attention": _window_case}


def _aten_ops(fn) -> int:
    """ATen ops of one call: the profiler's aten:: events not nested in another aten:: event."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.name.startswith("aten::")), key=lambda e: e.time_range.start)
    count, end = 0, -1
    for e in events:  # top level: starts after the previous top-level event ended
        if e.time_range.start >= end:
            count += 1
            end = e.time_range.end
    return count


def _launches(fn) -> int:
    """Triton launches of one call (those that reach a compiled kernel's launcher)."""
    from attnsr.kernels import _runtime

    with _runtime.recorded_launches() as record:
        fn()
    return len(record)


def measure(case: str, dtype=torch.float32, rounds: int = 7, calls: int = 200, device=None) -> dict:
    """Host µs per call of each provider of ``case`` (least-disturbed round), launches and ATen ops.
    On a GPU: wall µs per call, the GPU synchronised at the end of each round."""
    device = torch.device(device or "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    providers, meta = CASES[case](dtype, device)
    out = {"case": case, **meta, "dtype": str(dtype).replace("torch.", ""), "rounds": rounds, "calls": calls}
    per_round = {name: [] for name in providers}
    for fn in providers.values():  # warm-up: compile, caches
        fn()
        fn()
    for _ in range(rounds):
        for name, fn in providers.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            per_round[name].append((time.perf_counter() - start) / calls * 1e6)
    for name, fn in providers.items():
        out[name] = {"host_us": min(per_round[name]), "median_us": statistics.median(per_round[name]),
                     "launches": _launches(fn), "aten_ops": _aten_ops(fn)}
    out["ratio"] = out["fused"]["host_us"] / out["sdpa"]["host_us"]
    out["ratio_views"] = out["fused_views"]["host_us"] / out["sdpa"]["host_us"]
    out["ratio_torch"] = out["fused"]["host_us"] / out["torch"]["host_us"]
    return out


def format_row(row: dict) -> str:
    f, fv, sd, t = row["fused"], row["fused_views"], row["sdpa"], row["torch"]
    return (f"{row['op']:<17} {row['shape']:<25} packed {f['host_us']:6.1f} µs ({f['launches']} launches, "
            f"{f['aten_ops']} ATen ops)  views {fv['host_us']:6.1f} µs ({fv['aten_ops']})  SDPA "
            f"{sd['host_us']:6.1f} µs ({sd['aten_ops']})  torch backend {t['host_us']:6.1f} µs ({t['aten_ops']})"
            f"  packed/SDPA {row['ratio']:.2f}×  views/SDPA {row['ratio_views']:.2f}×  packed/torch "
            f"{row['ratio_torch']:.2f}×")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    from attnsr.timing import device_info

    rows = []
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    with contextlib.nullcontext() if on_gpu else launches_bound_not_run():
        for case in args.cases.split(","):
            row = measure(case, rounds=args.rounds, calls=args.calls, device=device)
            rows.append(row)
            print(format_row(row), flush=True)
    if args.out:
        info = device_info(device)
        info["method"] = ("wall time per call on the GPU, synchronised per round" if on_gpu else
                          "launches bound for sm_90, not run") + "; min over round-robin rounds"
        with open(args.out, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
