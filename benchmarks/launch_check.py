"""Every launch-table entry of the attention kernels run once on this device, each in its own
process, against a float64 reference: forward and every gradient.

    python -m benchmarks.launch_check [--cases REGEX] [--jobs N] [--json PATH]

Why a process per case: a kernel that faults on the GPU (an illegal memory access) loses the CUDA
context of its process, and every later launch there fails too; in one process the first fault
hides which other entries are sound. A launch setting that triton miscompiles can also return
wrong numbers with no error (the first H200 run: an fp32 dK/dV entry gave gradients 83% off at
head dim 108 and faulted at 128), which only a comparison against float64 shows. The test suite
checks the same numerics on a GPU but in shared worker processes; this runs first in
``benchmarks/run_gpu.sh`` and takes about a minute there.

Cases: ``image_attention`` on a fused-qkv NCHW map at head dims 16, 30, 64, 108, 128 and 256 (the
padded dims 16 to 256 of ``_LAUNCH``), 2×2 patches at head dim 64 (packed: pack kernel, sequence entries), in fp32 under
each precision (3×TF32, tf32, exact), fp16, bf16 and float64; ``window_attention`` (shifted, with
the relative-position bias table) at head dims 10, 30 and 64, windows 8 and 16, and 128 at window 8
(``_WIN_LAUNCH``'s "d256" entries); ``transposed_attention`` (Restormer's MDTA, the temperature's
gradient too) at 16, 48, 64 and 128 channels per head (the padded dims its launch rule tells apart)
in fp32, fp16, bf16 and float64.
Each row names the launch settings the case got. Bounds: ``attnsr.tolerances.REL_TOL`` per dtype,
5e-3 for fp32 with tf32 products (10-bit operands). Exit status 1 when a case faults, errs or is out
of bounds. Without a GPU the kernels run in Triton's interpreter (32×32 tiles, exact dots): a check
of this tool, not of the launch table.
"""

import argparse
import concurrent.futures
import json
import math
import os
import re
import subprocess
import sys

from attnsr.check import errors_vs_float64, worst
from attnsr.tolerances import FP32_PRECISION_TOL, REL_TOL

DTYPES = ("fp32", "fp32-tf32", "fp32-ieee", "fp16", "bf16", "fp64")


def cases() -> list:
    out = []
    for dtype in DTYPES:
        for d in (16, 30, 64, 108, 128, 256):
            out.append(dict(name=f"attention {dtype} D={d}", op="attention", dtype=dtype, head_dim=d, patch=1))
        out.append(dict(name=f"attention {dtype} D=64 p2", op="attention", dtype=dtype, head_dim=64, patch=2))
    for dtype in ("fp32", "fp16", "bf16", "fp64"):
        for d, windows in ((10, (8, 16)), (30, (8, 16)), (64, (8, 16)), (128, (8,))):
            for window in windows:
                out.append(dict(name=f"window {dtype} D={d} w{window}", op="window", dtype=dtype, head_dim=d,
                                window=window))
    for dtype in ("fp32", "fp16", "bf16", "fp64"):
        for d in (16, 48, 64, 128):
            out.append(dict(name=f"transposed {dtype} D={d}", op="transposed", dtype=dtype, head_dim=d))
    return out


def run_case(case: dict) -> dict:
    """In this process: the case's op, forward and backward, against float64 (see the module header)."""
    import importlib

    import torch

    from attnsr.kernels import attention as attn
    from attnsr.kernels.reference import image_attention_ref, window_attention_ref

    win = importlib.import_module("attnsr.kernels.window_attention")  # the package exports a function of that name
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}.get(case["dtype"], torch.float32)
    precision = {"fp32-tf32": "tf32", "fp32-ieee": "ieee"}.get(case["dtype"])
    gen = torch.Generator().manual_seed(0)
    d = case["head_dim"]
    if case["op"] == "transposed":
        ta = importlib.import_module("attnsr.kernels.transposed_attention")
        from attnsr.kernels.reference import transposed_attention_ref

        heads = 2
        c = heads * d
        qkv64 = torch.randn(2, 3 * c, 9, 13, generator=gen, dtype=torch.float64)  # 117 pixels: partial token blocks
        tau64 = 0.5 + torch.rand(heads, 1, 1, generator=gen, dtype=torch.float64)
        dp = max(16, 1 << (d - 1).bit_length())
        config = {}
        for k in ("gram", "softmax", "apply", "grad_finalize", "grad_apply"):
            block_n, launch = ta._settings(dp, dtype, k)
            config[k] = (dict(BLOCK_N=block_n), launch)

        def fused(qkv, tau):
            return ta.transposed_attention_qkv(qkv, tau, heads=heads)

        def reference(qkv, tau):
            return transposed_attention_ref(*qkv.chunk(3, 1), tau, heads=heads)

        inputs64 = [qkv64, tau64]
    elif case["op"] == "attention":
        p = case["patch"]
        c = d // (p * p)
        h, w = 9 * p, 13 * p  # 117 tokens: partial tiles on both axes
        qkv64 = torch.randn(2, 3 * c, h, w, generator=gen, dtype=torch.float64)
        config = {k: attn._config(k, d, dtype, p, precision) for k in ("fwd", "dkdv", "dq")}

        def fused(qkv):
            return attn.image_attention(*qkv.split(c, 1), patch_size=p, precision=precision)

        def reference(qkv):
            return image_attention_ref(*qkv.split(c, 1), patch_size=p)

        inputs64 = [qkv64]
    else:
        heads, window = 2, case["window"]
        c = heads * d
        size = 2 * window
        qkv64 = torch.randn(1, size, size, 3 * c, generator=gen, dtype=torch.float64)
        table64 = 0.5 * torch.randn((2 * window - 1) ** 2, heads, generator=gen, dtype=torch.float64)
        config = {k: win._config(k, d, dtype) for k in ("fwd", "dkdv", "dq")}
        kw = dict(window_size=window, shift_size=window // 2, heads=heads)

        def fused(qkv, table):
            return win.window_attention(*qkv.split(c, -1), bias_table=table, **kw)

        def reference(qkv, table):
            return window_attention_ref(*qkv.split(c, -1), bias_table=table, **kw)

        inputs64 = [qkv64, table64]
    row = dict(case, config={k: {**b, **cfg} for k, (b, cfg) in config.items()}, device=str(device))
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in inputs64]
    out = fused(*leaves)
    if device.type == "cuda":
        torch.cuda.synchronize()
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    got = torch.autograd.grad(out, leaves, grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
    errors = errors_vs_float64(reference, leaves, out, got, grad)  # against the inputs as the op got them
    bound = FP32_PRECISION_TOL["tf32"] if precision == "tf32" and device.type == "cuda" else REL_TOL[dtype]
    ok = worst(errors.values()) <= bound  # a NaN error (a garbage read) is no pass
    return dict(row, errors=errors, bound=bound, status="ok" if ok else "out of bounds")


def _child(name: str) -> None:
    (case,) = [c for c in cases() if c["name"] == name]
    try:
        row = run_case(case)
    except Exception as e:  # reported as a row: the parent prints it beside the others
        row = dict(case, status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    print("LAUNCH-CHECK " + json.dumps(row), flush=True)
    os._exit(0)  # the row is out: no CUDA teardown, which can hang after a fault


def run_isolated(case: dict, timeout_s: float = 60.0) -> dict:
    """``case`` in a child process (``CUDA_LAUNCH_BLOCKING=1``: a fault is reported at its launch)."""
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("TRITON_INTERPRET", "1")
        proc = subprocess.run([sys.executable, "-m", "benchmarks.launch_check", "--child", case["name"]],
                              capture_output=True, text=True, timeout=timeout_s, env=env, cwd=root)
    except subprocess.TimeoutExpired:
        return dict(case, status="error", error=f"no result within {timeout_s:g} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LAUNCH-CHECK ")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(case, status="error", error=f"exit {proc.returncode}: {tail[:300]}")
    return json.loads(lines[-1][len("LAUNCH-CHECK "):])


def _settings(row) -> str:
    parts = []
    for kernel, c in row.get("config", {}).items():
        blocks = "×".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N") if k in c)
        launch = f"/{c['num_warps']}/{c.get('num_stages', '-')}" if "num_warps" in c else ""
        parts.append(f"{kernel} {blocks}{launch}")
    return ", ".join(parts)


HEADER = ("| case | status | worst error / bound | launch settings (BLOCK_M×BLOCK_N/warps/stages) |\n"
          "|---|---|---|---|")


def format_row(r) -> str:
    if "errors" in r:
        name = max(r["errors"], key=lambda k: (math.isnan(r["errors"][k]), r["errors"][k]))
        figure = f"{r['errors'][name]:.1e} ({name}) / {r['bound']:.0e}"
    else:
        figure = r.get("error", "")
    return f"| {r['name']} | {r['status']} | {figure} | {_settings(r)} |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="", help="regular expression on the case names (default: all)")
    parser.add_argument("--jobs", type=int, default=4, help="cases run at once (default 4)")
    parser.add_argument("--json", help="write the rows here (rewritten after each case)")
    parser.add_argument("--timeout-s", type=float, default=60.0,
                        help="a case with no result after this many seconds is an error row (default 60)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0
    todo = [c for c in cases() if re.search(args.cases, c["name"])]
    if not todo:
        print(f"launch_check: no case matches {args.cases!r}", file=sys.stderr)
        return 2
    print(HEADER, flush=True)
    order = {c["name"]: i for i, c in enumerate(todo)}
    rows = []
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(run_isolated, c, args.timeout_s) for c in todo]
        for future in concurrent.futures.as_completed(futures):  # each row as it is known: a run stopped early
            row = future.result()  # keeps them, and one slow case holds back no other
            rows.append(row)
            rows.sort(key=lambda r: order[r["name"]])
            print(format_row(row), flush=True)
            if args.json:
                with open(args.json + ".tmp", "w") as f:
                    json.dump({"cases": len(todo), "rows": rows}, f, indent=1)
                os.replace(args.json + ".tmp", args.json)
    bad = [r for r in rows if r["status"] != "ok"]
    print(f"\n{len(rows)} cases, {len(bad)} faulted, erred or out of bounds")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
