"""Time per GPU kernel of one forward+backward of each headline case, fused and torch path side by side.

    python -m benchmarks.profile [--out PATH.json] [--table PATH.txt] [--cases a,b,...]

So that a slow op shows which kernel and how many launches: for each case and provider, one warm-up
step, then one step under ``torch.profiler`` (CPU and CUDA activity); the table lists the step's
GPU kernels by GPU time (launches, total µs, share), the launches in all and the step's wall time.

Cases (the headline cases of the H200 run): attention forward+backward in bf16 and fp32 at head
dims 64 and 128 (4×64×64×64 and 1×128×128×128, one head), 2×2 patches (4×64×64×64, D = 256),
HAT's window attention (16×64×64×180, window 16, shifted) and SwinIR's (16×48×48×180, window 8),
CBAM (4×128×256², bf16), RCAN's channel attention (16×64×64×64), and the training steps of the two
networks (AttentionSRNet and ImageInpaintingModel at 256², bf16 autocast). Providers: ``triton``
(the fused kernels), ``torch`` (SDPA, eager gating) and, for the networks, ``auto``.
"""

import argparse
import json
import os
import sys
import time

import torch

from attnsr import tune

OPS = {
    "attention bf16 d64": tune.Case("attention", "bfloat16", (4, 64, 64, 64, 1, 1), "train"),
    "attention fp32 d64": tune.Case("attention", "float32", (4, 64, 64, 64, 1, 1), "train"),
    "attention bf16 d128": tune.Case("attention", "bfloat16", (1, 128, 128, 128, 1, 1), "train"),
    "attention fp32 d128": tune.Case("attention", "float32", (1, 128, 128, 128, 1, 1), "train"),
    "attention fp32 2x2 patches": tune.Case("attention", "float32", (4, 64, 64, 64, 1, 2), "train"),
    "HAT window bf16": tune.Case("window", "bfloat16", (16, 64, 64, 180, 6, 16, 8), "train"),
    "HAT window fp32": tune.Case("window", "float32", (16, 64, 64, 180, 6, 16, 8), "train"),
    "SwinIR window bf16": tune.Case("window", "bfloat16", (16, 48, 48, 180, 6, 8, 4), "train"),
    "CBAM bf16": tune.Case("cbam_gate", "bfloat16", (4, 128, 256, 256), "train"),
    "RCAN channel attention fp32": tune.Case("channel_gate", "float32", (16, 64, 64, 64), "train"),
}
NETWORKS = {
    "AttentionSRNet train step bf16": dict(op="AttentionSRNet", size=128, batch=4),
    "ImageInpaintingModel train step bf16": dict(op="ImageInpaintingModel", size=256, batch=1),
}


def _steps(name: str, device: torch.device):
    """{provider: () -> None} for a case: one forward and backward (a network's whole train step)."""
    if name in OPS:
        calls = tune._Calls(OPS[name], device)
        return {p: (lambda p=p: calls.run(p)) for p in ("triton", "torch")}
    from benchmarks import networks

    spec = NETWORKS[name]
    steps = {}
    for provider in ("triton", "torch", "auto"):
        case = dict(suite="networks", provider=provider, dtype="bfloat16", mode="train step", **spec)
        steps[provider] = networks.build(case, device).fn
    return steps


def _kernel_rows(prof) -> list:
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        if us and getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type):
            rows.append(dict(kernel=e.key, launches=e.count, gpu_us=float(us)))
    rows.sort(key=lambda r: -r["gpu_us"])
    return rows


def profile(name: str, device: torch.device) -> list:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = []
    for provider, step in _steps(name, device).items():
        step()  # warm-up: compiles, launch plans, caches
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize(device)
        wall = (time.perf_counter() - start) * 1e3
        kernels = _kernel_rows(prof)
        out.append(dict(case=name, provider=provider, wall_ms=wall, launches=sum(k["launches"] for k in kernels),
                        gpu_us=sum(k["gpu_us"] for k in kernels), kernels=kernels))
    return out


def format_table(rows: list, top: int = 8) -> str:
    lines = []
    for r in rows:
        lines.append(f"\n{r['case']} [{r['provider']}]: {r['launches']} launches, {r['gpu_us'] / 1e3:.3f} ms of GPU "
                     f"kernels, {r['wall_ms']:.3f} ms wall (profiled)")
        if r.get("error"):
            lines.append(f"  error: {r['error']}")
        for k in r["kernels"][:top]:
            share = k["gpu_us"] / r["gpu_us"] * 100 if r["gpu_us"] else 0.0
            lines.append(f"  {k['gpu_us']:10.1f} µs {share:5.1f}%  ×{k['launches']:<4} {k['kernel'][:90]}")
        if len(r["kernels"]) > top:
            rest = sum(k["gpu_us"] for k in r["kernels"][top:])
            lines.append(f"  {rest:10.1f} µs in {len(r['kernels']) - top} more kernels")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join([*OPS, *NETWORKS]), help="comma-separated case names")
    p.add_argument("--out", default=None, help="JSON of every row")
    p.add_argument("--table", default=None, help="the text table (also printed)")
    p.add_argument("--budget-s", type=float, default=None, help="start no case after this many seconds")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.profile: times GPU kernels; there is no CUDA device here", file=sys.stderr)
        return 2
    from attnsr.timing import device_info

    device = torch.device("cuda")
    start = time.monotonic()
    rows, skipped = [], []
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if name not in OPS and name not in NETWORKS:
            p.error(f"--cases: unknown case {name!r}; expected some of {', '.join([*OPS, *NETWORKS])}")
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            skipped.append(name)
            continue
        try:
            rows.extend(profile(name, device))
        except Exception as e:  # a failing case is a row, not the end of the run
            rows.append(dict(case=name, provider="-", error=f"{type(e).__name__}: {e}"[:300], kernels=[],
                             launches=0, gpu_us=0.0, wall_ms=0.0))
        torch.cuda.empty_cache()
    table = format_table(rows) + (f"\n\nnot run (budget): {', '.join(skipped)}" if skipped else "")
    print(table)
    if args.table:
        with open(args.table, "w") as f:
            f.write(table + "\n")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"info": device_info(device), "rows": rows, "skipped": skipped}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
