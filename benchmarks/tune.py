"""Measure launch configurations of the attention kernels; record them; propose ``_LAUNCH`` entries.

    python -m benchmarks.tune [--quick] [--out PATH] [--budget-s 420] [--jobs N]
                              [--kernels fwd,dkdv,dq] [--head-dims 64,128,256]
                              [--dtypes bfloat16,float16,float32]      # "tf32": fp32 with tf32 allowed
    python -m benchmarks.tune --suggest PATH.json                      # proposed table entries

What is measured. One *group* per kernel of ``kernels/attention.py`` ("fwd"; "dkdv" and "dq",
each timed through ``attention_backward`` with only its gradient asked for, so its time includes
the Δ kernel at its table config: one read of O and dO, about 1% of the backward) × head dim ×
dtype. Inputs are q, k, v split out of one fused-qkv NCHW map (B, 3C, 128, 128), C = heads·D, as
``SelfAttention2d`` produces them: N = 16384 tokens, B = 4, heads = 2, so 8 (batch, head) pairs and
1024 to 4096 programs per launch (tiles of 128 to 32 rows): several waves on 132 SMs.
Candidates: BLOCK_M, BLOCK_N ∈ {32, 64, 128} × num_warps ∈ {4, 8} × num_stages ∈ {1, 2, 3}, less
those that cannot fit: the shared-memory estimate of ``attnsr.kernels.attention._shared_memory_estimate``
over the device's per-block limit, or fp32 accumulators alone over 255 registers per thread (such
rows are kept with status "pruned: ..."). A candidate keeps its entry's head-dim chunk and dK/dV
split (``_Launch.chunk`` / ``split``), and a proposed line carries them. The group's current
default (its ``_LAUNCH`` entry) runs first and again last: the two times give the group's spread,
the noise floor of its ratios.
On a GPU each compile worker also compiles its candidate through the compile report
(``attnsr.kernels.compile_report.check_config``, for the GPU's architecture, sm_80 or sm_90): a
candidate that spills, overflows shared memory or misses wgmma where the compile gate asks for it
gets status "gate: <kernel, case and figure>" and is neither timed nor proposed.
Each candidate runs once with its outputs poisoned (NaN) before the launch and is compared with
the default's outputs (‖c − d‖/‖d‖; over the dtype's bound in ``AGREE`` the row says "wrong"),
then is timed with ``triton.testing.do_bench`` (median, L2 flushed between runs). A compile error
or out-of-resources is a row with its status, never a crash. TFLOP/s count the dot products:
4·B·heads·N²·D (fwd), 8· (dkdv: S, dV, dP, dK) and 6· (dq: S, dP, dQ).

Time. Compiling a candidate takes seconds, timing it a fraction of one. Worker processes
(``--jobs``, default: the cores less two, at most 12) first compile every candidate, each on a
batch-1 copy of the inputs (the same kernel specialisation), into Triton's on-disk cache; the GPU
is idle for timing meanwhile. A worker that dies marks the candidate it was on as "crashed" and is
replaced. The compile phase stops at half the budget; then the timing process goes through the
groups, giving each an equal share of the time left (unused time passes on) and starting no
candidate after its share or the whole ``--budget-s`` is spent (candidates left are "not run:
budget"). The JSON is rewritten after every group, so a run cut short keeps what it measured.

Output. ``--out`` (default ``benchmarks/results/tune-<device>-<date>.json``): ``info`` (device,
torch, triton, date, shape, budget, smem limit, precision), ``groups`` (the default and the best
per group) and ``rows`` (every candidate with status, median_ms, tflops, rel_err, speedup). Then a
table of the best configuration per group. ``--suggest`` reads such a file and prints ``_LAUNCH``
lines for the measured (kernel, BLOCK_D, dtype class) keys with their figures; the bf16 and fp16
groups share the "16bit" entry, so a proposal must be correct in both and is ranked by its mean
time relative to each dtype's default; it replaces the default only when faster by more than
max(2%, twice the spread).

On CPU, Triton runs the kernels in its interpreter: ``--quick`` (N = 64, D = 32, fp32 and fp16,
two candidates per kernel) only exercises this plumbing; its times mean nothing.
"""

import argparse
import contextlib
import datetime
import itertools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import attnsr.kernels.attention as attn
from attnsr.tolerances import TUNE_AGREE
from attnsr.tune import precision as _precision
from benchmarks import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

TUNED_KERNELS = ("fwd", "dkdv", "dq")
SHAPE = dict(batch=4, heads=2, size=128)  # N = 128·128 = 16384 tokens
QUICK_SHAPE = dict(batch=1, heads=2, size=8)  # N = 64
HEAD_DIMS = (64, 128, 256)
DTYPES = ("bfloat16", "float16", "float32")
QUICK_DTYPES = ("float32", "float16")
GRID = dict(BLOCK_M=(32, 64, 128), BLOCK_N=(32, 64, 128), num_warps=(4, 8), num_stages=(1, 2, 3))
QUICK_CANDIDATES = (dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
                    dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2))
# a correct candidate differs from the default only by summation order and roundings to the dtype
AGREE = TUNE_AGREE  # the package tuner's bounds (attnsr.tolerances)
HOPPER_SMEM = 227 * 1024  # per-block shared memory of H100/H200, for the interpreter (no limit of its own)
MAX_REGISTERS = 255
FLOPS_PER_PAIR = {"fwd": 4, "dkdv": 8, "dq": 6}  # × N·M·D per (batch, head)
SETTINGS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
RESULT_MARK = "tune-result "  # prefix of a compile worker's result lines on its stdout
WORKER_COMMAND = (sys.executable, "-m", "benchmarks.tune", "--worker")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _torch_dtype(name: str) -> torch.dtype:
    return torch.float32 if name == "tf32" else getattr(torch, name)


def _cfg_name(cfg: dict) -> str:
    warps = "-" if cfg.get("num_warps") is None else cfg["num_warps"]
    stages = "-" if cfg.get("num_stages") is None else cfg["num_stages"]
    return f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{warps} s{stages}"


@contextlib.contextmanager
def _poisoned_outputs():
    """The launchers' outputs (out, dq, dk, dv) start as NaN: an element a kernel skips shows up."""
    plain = attn._Tokens.empty_like

    def poisoned(self, t):
        return plain(self, t).fill_(float("nan"))

    attn._Tokens.empty_like = poisoned
    try:
        yield
    finally:
        attn._Tokens.empty_like = plain


# ----------------------------------------------------------------------------------------------
# Inputs and the timed calls
# ----------------------------------------------------------------------------------------------


def _inputs(shape: dict, head_dim: int, dtype_name: str, device: torch.device, batch=None, forward=True) -> dict:
    """q, k, v split out of one fused-qkv map, an upstream gradient, and the default forward's out/LSE
    (random stand-ins with the same layout when not ``forward``: a compile worker needs no values)."""
    b = shape["batch"] if batch is None else batch
    heads, size = shape["heads"], shape["size"]
    c = heads * head_dim
    dtype = _torch_dtype(dtype_name)
    gen = torch.Generator(device).manual_seed(head_dim)
    qkv = torch.randn(b, 3 * c, size, size, device=device, dtype=dtype, generator=gen)
    q, k, v = qkv.split(c, dim=1)
    layout, n_q, n_kv, d = attn._geometry(q, k, "map", heads, 1)
    inp = dict(q=q, k=k, v=v, layout=layout, n=n_q, d=d, scale=d ** -0.5,
               do=torch.randn(b, c, size, size, device=device, dtype=dtype, generator=gen))
    if forward:
        inp["out"], inp["lse"] = attn.attention_forward(q, k, v, layout, n_q, n_kv, d, inp["scale"])
    else:
        inp["out"] = torch.randn(b, c, size, size, device=device, dtype=dtype, generator=gen)
        inp["lse"] = torch.zeros(b, heads, n_q, device=device, dtype=attn.stat_dtype(dtype))
    return inp


def _call(kernel: str, inp: dict):
    """() -> the kernel's outputs: fwd (out, LSE); dkdv (dK, dV); dq (dQ,)."""
    args = (inp["q"], inp["k"], inp["v"])
    geometry = (inp["layout"], inp["n"], inp["n"], inp["d"], inp["scale"])
    if kernel == "fwd":
        return lambda: attn.attention_forward(*args, *geometry)
    need_dq = kernel == "dq"

    def backward():
        dq, dk, dv = attn.attention_backward(inp["do"], *args, inp["out"], inp["lse"], *geometry,
                                             need_dq=need_dq, need_dkdv=not need_dq)
        return (dq,) if need_dq else (dk, dv)

    return backward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel_err(got, want) -> float:
    worst = 0.0
    for g, w in zip(got, want):
        g, w = g.double(), w.double()
        if not torch.isfinite(g).all():
            return float("inf")
        worst = max(worst, ((g - w).norm() / w.norm().clamp_min(1e-300)).item())
    return worst


def _time_ms(fn, device: torch.device, warmup_ms: float, rep_ms: float) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return harness.time_ms(fn, device, cpu_repeats=1)  # the interpreter: plumbing only


def _error_status(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"error: {type(e).__name__}: {first[:300]}"


# ----------------------------------------------------------------------------------------------
# Candidates
# ----------------------------------------------------------------------------------------------


def _default_cfg(kernel: str, head_dim: int, dtype_name: str) -> dict:
    blocks, launch = attn._config(kernel, head_dim, _torch_dtype(dtype_name))
    return dict(BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"], num_warps=launch.get("num_warps"),
                num_stages=launch.get("num_stages"))


def _prune(kernel: str, cfg: dict, head_dim: int, dtype_name: str, smem_limit: int):
    """(reason or None, shared-memory estimate in bytes) for a candidate."""
    block_d = attn._block_d(head_dim)
    elt = _torch_dtype(dtype_name).itemsize
    stages, warps = cfg["num_stages"] or 1, cfg["num_warps"] or 4  # None: the interpreter's default
    smem = attn._shared_memory_estimate(kernel, cfg["BLOCK_M"], cfg["BLOCK_N"], block_d, elt, stages)
    if smem > smem_limit:
        return f"pruned: shared memory estimate {smem // 1024} KiB > {smem_limit // 1024} KiB", smem
    split = kernel == "dkdv" and attn._LAUNCH[(kernel, block_d, attn._dtype_class(_torch_dtype(dtype_name)))].split
    acc_rows = {"fwd": cfg["BLOCK_M"], "dq": cfg["BLOCK_M"], "dkdv": (1 if split else 2) * cfg["BLOCK_N"]}[kernel]
    regs = acc_rows * block_d // (32 * warps)
    if regs > MAX_REGISTERS:
        return f"pruned: fp32 accumulators alone need {regs} registers per thread (> {MAX_REGISTERS})", smem
    return None, smem


def _candidates(kernel: str, head_dim: int, dtype_name: str, quick: bool, smem_limit: int) -> list:
    """Rows of one group, default first, then the rest nearest the default first (fewest settings
    changed, then larger tiles), so that a budget cut keeps the default's neighbourhood."""
    default = _default_cfg(kernel, head_dim, dtype_name)
    grid = QUICK_CANDIDATES if quick else [dict(zip(SETTINGS, vals)) for vals in itertools.product(*GRID.values())]
    others = [dict(c) for c in grid if c != default]
    others.sort(key=lambda c: (sum(c[s] != default[s] for s in SETTINGS), -c["BLOCK_M"] * c["BLOCK_N"],
                               -c["num_stages"], c["num_warps"], -c["BLOCK_M"]))
    rows = []
    for cfg in [default, *others]:
        reason, smem = _prune(kernel, cfg, head_dim, dtype_name, smem_limit)
        reason = None if cfg is default else reason  # the default always runs: it is the baseline
        rows.append(dict(kernel=kernel, head_dim=head_dim, dtype=dtype_name, block_d=attn._block_d(head_dim),
                         default=cfg is default, **cfg, status=reason or "pending",
                         smem_estimate_kib=smem // 1024, median_ms=None, tflops=None, rel_err=None,
                         speedup=None, compile_s=None, precompiled=False, first_run_s=None))
    return rows


# ----------------------------------------------------------------------------------------------
# Compile phase: worker processes fill Triton's cache
# ----------------------------------------------------------------------------------------------


def _launch_cfg(row: dict) -> dict:
    return {s: row[s] for s in SETTINGS if row[s] is not None}


REPORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "tf32": "fp32-tf32"}


def _gate(task: dict):
    """"gate: <figure>" when the candidate, compiled for this GPU's architecture by the compile
    report (``attnsr.kernels.compile_report.check_config``: its fused-qkv case, compile only),
    spills, overflows shared memory or misses wgmma where the gate asks for it; else None. None
    as well where the report has no rules (no CUDA device, or an architecture other than sm_80 / sm_90)."""
    from attnsr.kernels import compile_report

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    if arch not in compile_report.SMEM_LIMIT:
        return None
    failures = compile_report.check_config(task["kernel"], task["head_dim"], REPORT_DTYPE[task["dtype"]],
                                           task["cfg"], archs=(arch,))[1]
    return f"gate: {failures[0]}" if failures else None


def _worker() -> None:
    """``--worker``: read {"shape", "tasks"} as JSON on stdin; run each task once; print one JSON line each."""
    spec = json.load(sys.stdin)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cached_key, inp = None, None
    for task in spec["tasks"]:
        start = time.monotonic()
        status = "ok"
        try:
            with _precision(task["dtype"]):
                key = (task["head_dim"], task["dtype"])
                if key != cached_key:
                    cached_key, inp = None, None
                    inp = _inputs(spec["shape"], task["head_dim"], task["dtype"], device, batch=1, forward=False)
                    cached_key = key
                with attn._launch_override(task["kernel"], **task["cfg"]):
                    _call(task["kernel"], inp)()
                _sync(device)
            status = _gate(task) or status
        except Exception as e:  # a compile error or out-of-resources is a result, not a failure
            status = _error_status(e)
        result = {"id": task["id"], "status": status, "compile_s": time.monotonic() - start}
        print(RESULT_MARK + json.dumps(result), flush=True)


def _precompile(tasks: list, jobs: int, shape: dict, deadline: float) -> dict:
    """Run ``tasks`` ({"id", "kernel", "head_dim", "dtype", "cfg"}) in ``jobs`` worker processes until
    ``deadline``; returns id -> (status, seconds) for the tasks that finished."""
    done, procs, lines = {}, {}, queue.Queue()
    shares = [tasks[w::jobs] for w in range(jobs)]
    fails, progress = [0] * jobs, [0] * jobs
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def start(w: int) -> None:
        todo = [t for t in shares[w] if t["id"] not in done]
        if not todo or time.monotonic() >= deadline:
            return
        err = tempfile.TemporaryFile()
        proc = subprocess.Popen(list(WORKER_COMMAND), cwd=ROOT, env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        proc.stdin.write(json.dumps({"shape": shape, "tasks": todo}))
        proc.stdin.close()

        def read():
            for line in proc.stdout:
                if line.startswith(RESULT_MARK):
                    lines.put((w, json.loads(line[len(RESULT_MARK):])))
            lines.put((w, None))

        threading.Thread(target=read, daemon=True).start()
        procs[w], progress[w] = (proc, err, todo), 0

    try:
        for w in range(jobs):
            start(w)
        while procs:
            try:
                w, result = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if result is not None:
                done[result["id"]] = (result["status"], result["compile_s"])
                progress[w] += 1
                continue
            proc, err, todo = procs.pop(w)
            proc.wait()
            left = [t for t in todo if t["id"] not in done]
            if left:  # it died while on left[0]
                err.seek(0)
                tail = " ".join(err.read().decode(errors="replace").strip().splitlines()[-1:])
                done[left[0]["id"]] = (f"crashed: compile worker exited with code {proc.returncode} {tail[:300]}", None)
                fails[w] = 0 if progress[w] else fails[w] + 1
                if fails[w] < 3:  # a worker that keeps dying on its first task is not replaced
                    start(w)
            err.close()
    finally:
        for proc, err, _ in procs.values():
            proc.kill()
            proc.wait()
            err.close()
    return done


# ----------------------------------------------------------------------------------------------
# Timing phase
# ----------------------------------------------------------------------------------------------


def _measure(row: dict, run, reference, device: torch.device, flops: float, args) -> tuple:
    """Run ``row``'s candidate once on poisoned outputs, compare with ``reference`` (the default's
    outputs; None for the default itself, which must only be finite), time it; fill the row.
    Returns (outputs or None, whether the CUDA context is still usable)."""
    outs = None
    try:
        with attn._launch_override(row["kernel"], **_launch_cfg(row)):
            start = time.monotonic()
            with _poisoned_outputs():
                outs = run()
            _sync(device)
            row["first_run_s"] = time.monotonic() - start
            row["rel_err"] = _rel_err(outs, outs if reference is None else reference)
            row["median_ms"] = _time_ms(run, device, args.warmup_ms, args.rep_ms)
    except Exception as e:
        row["status"] = _error_status(e)
        if device.type == "cuda":
            try:
                torch.cuda.synchronize(device)
            except Exception:  # an illegal address poisons the context: nothing after it can run
                return None, False
        return None, True
    row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
    bound = AGREE[row["dtype"]]
    if row["rel_err"] <= bound:
        row["status"] = "ok"
        return outs, True
    what = "has non-finite or unwritten elements" if reference is None else "differs from the default by"
    row["status"] = f"wrong: {what} {row['rel_err']:.2e} (bound {bound:.0e})"
    return None, True


def _summary(rows: list, repeat_ms) -> dict:
    default = rows[0]
    good = [r for r in rows if r["status"] == "ok" and r["median_ms"] is not None]
    best = min(good, key=lambda r: r["median_ms"]) if good else None
    base = default["median_ms"]
    spread = None if base is None or repeat_ms is None else abs(repeat_ms - base) / min(repeat_ms, base)
    return dict(kernel=default["kernel"], head_dim=default["head_dim"], dtype=default["dtype"],
                block_d=default["block_d"], default=_cfg_name(default), default_ms=base, default_repeat_ms=repeat_ms,
                spread=spread, best=None if best is None else _cfg_name(best),
                best_ms=None if best is None else best["median_ms"],
                speedup=None if best is None or base is None else base / best["median_ms"],
                tflops=None if best is None else best["tflops"],
                measured=sum(r["median_ms"] is not None for r in rows),
                wrong=sum(r["status"].startswith("wrong") for r in rows),
                candidates=sum(not r["status"].startswith("pruned") for r in rows))


def _write(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(groups: list, file=sys.stdout) -> None:
    print(f"{'kernel':<6} {'D':>4} {'dtype':<9} {'default':<14} {'ms':>8} {'spread':>7}  {'best':<14} {'ms':>8} "
          f"{'speed-up':>8} {'TFLOP/s':>8} {'measured':>9} {'wrong':>5}", file=file)
    for g in groups:
        print(f"{g['kernel']:<6} {g['head_dim']:>4} {g['dtype']:<9} {g['default']:<14} {_fmt(g['default_ms'], '8.3f')} "
              f"{_fmt(None if g['spread'] is None else 100 * g['spread'], '6.1f')}%  {g['best'] or '-':<14} "
              f"{_fmt(g['best_ms'], '8.3f')} {_fmt(g['speedup'], '7.2f')}x {_fmt(g['tflops'], '8.1f')} "
              f"{g['measured']:>4}/{g['candidates']:<4} {g['wrong']:>5}", file=file)


def _smem_limit(device: torch.device) -> int:
    if device.type != "cuda":
        return HOPPER_SMEM
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", HOPPER_SMEM))


def tune(args) -> dict:
    start = time.monotonic()
    deadline = start + args.budget_s
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick
    shape = QUICK_SHAPE if quick else SHAPE
    head_dims = args.head_dims or ((32,) if quick else HEAD_DIMS)
    dtypes = args.dtypes or (QUICK_DTYPES if quick or device.type != "cuda" else DTYPES)
    smem_limit = _smem_limit(device)
    jobs = args.jobs if args.jobs is not None else (min(12, max(1, (os.cpu_count() or 2) - 2))
                                                    if device.type == "cuda" else 0)
    n = shape["size"] ** 2
    info = dict(harness.device_info(device), shape=dict(shape, tokens=n, layout="NCHW fused qkv"),
                budget_s=args.budget_s, jobs=jobs, quick=quick, smem_limit_kib=smem_limit // 1024,
                interpreter=attn.interpreting(), warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, precision={})
    for d in dtypes:
        with _precision(d):
            info["precision"][d] = attn.dot_precision(_torch_dtype(d))  # tl.dot's for fp32 operands

    groups = [(d, h, k) for d in dtypes for h in head_dims for k in args.kernels]
    rows = {g: _candidates(g[2], g[1], g[0], quick, smem_limit) for g in groups}
    payload = dict(info=info, groups=[], rows=[r for g in groups for r in rows[g]])
    _write(args.out, payload)

    runnable = {g: [r for r in rows[g] if r["status"] == "pending"] for g in groups}
    if jobs > 0:
        tasks, by_id = [], {}
        for rank in range(max(len(v) for v in runnable.values())):  # round robin: every group's first ones first
            for g in groups:
                if rank < len(runnable[g]):
                    row = runnable[g][rank]
                    by_id[len(tasks)] = row
                    tasks.append(dict(id=len(tasks), kernel=row["kernel"], head_dim=row["head_dim"],
                                      dtype=row["dtype"], cfg=_launch_cfg(row)))
        _log(f"compiling {len(tasks)} candidates in {jobs} worker processes")
        done = _precompile(tasks, jobs, shape, start + args.budget_s * args.compile_share)
        for i, (status, seconds) in done.items():
            row = by_id[i]
            row["compile_s"], row["precompiled"] = seconds, True
            if status.startswith("gate:") and row["default"]:
                row["gate"] = status  # the baseline runs anyway; tests/test_compile_report.py fails on it
            elif status != "ok":
                row["status"] = status
        _log(f"compiled {len(done)} of {len(tasks)} in {time.monotonic() - start:.0f} s")

    alive, inp, inp_key = True, None, None
    for i, g in enumerate(groups):
        dtype_name, head_dim, kernel = g
        group = rows[g]
        share_end = time.monotonic() + (deadline - time.monotonic()) / (len(groups) - i)
        repeat_ms = None
        if alive and time.monotonic() < deadline:
            with _precision(dtype_name):
                if inp_key != (dtype_name, head_dim):
                    inp = None  # free the previous inputs first
                    inp, inp_key = _inputs(shape, head_dim, dtype_name, device), (dtype_name, head_dim)
                run = _call(kernel, inp)
                flops = FLOPS_PER_PAIR[kernel] * shape["batch"] * shape["heads"] * n * n * head_dim
                reference = None  # a default that failed its compile is not run again: no baseline, no group
                if group[0]["status"] == "pending":
                    reference, alive = _measure(group[0], run, None, device, flops, args)
                todo = [r for r in group[1:] if r["status"] == "pending"]
                for j, row in enumerate(todo, 1):
                    if not alive or reference is None or time.monotonic() >= min(share_end, deadline):
                        break
                    _, alive = _measure(row, run, reference, device, flops, args)
                    _log(f"[{kernel} D{head_dim} {dtype_name} {j}/{len(todo)}] {_cfg_name(row)}: "
                         f"{_fmt(row['median_ms'], '.3f')} ms {row['status']}")
                if alive and group[0]["median_ms"] is not None:
                    with attn._launch_override(kernel, **_launch_cfg(group[0])):
                        repeat_ms = _time_ms(run, device, args.warmup_ms, args.rep_ms)
        for row in group:
            if row["status"] == "pending":
                row["status"] = "not run: budget" if alive else "not run: the CUDA context failed earlier"
            if row["median_ms"] is not None and group[0]["median_ms"] is not None:
                row["speedup"] = group[0]["median_ms"] / row["median_ms"]
        payload["groups"].append(_summary(group, repeat_ms))
        info["elapsed_s"] = time.monotonic() - start
        _write(args.out, payload)
        _log(f"group {i + 1}/{len(groups)} {kernel} D{head_dim} {dtype_name}: {time.monotonic() - start:.0f} s")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return payload


# ----------------------------------------------------------------------------------------------
# Proposed table entries
# ----------------------------------------------------------------------------------------------


def suggest(payload: dict) -> list:
    """``_LAUNCH`` lines for every measured (kernel, BLOCK_D, dtype class), with their figures."""
    classes = {"bfloat16": "16bit", "float16": "16bit", "float32": "fp32", "tf32": "fp32"}
    spread = {(g["kernel"], g["head_dim"], g["dtype"]): g["spread"] or 0.0 for g in payload["groups"]}
    keyed = {}
    for r in payload["rows"]:
        if r["status"] == "ok" and r["median_ms"] is not None:
            keyed.setdefault((r["kernel"], r["block_d"], classes[r["dtype"]]), []).append(r)
    if payload["info"].get("interpreter"):
        return []  # interpreter timings say nothing about a GPU
    device = payload["info"]["device"]
    lines = []
    order = lambda key: (attn._KERNELS.index(key[0]), key[1], attn._DTYPE_CLASSES.index(key[2]))  # noqa: E731
    for (kernel, block_d, cls), rs in sorted(keyed.items(), key=lambda item: order(item[0])):
        dtypes = sorted({r["dtype"] for r in rs})
        default_ms = {r["dtype"]: r["median_ms"] for r in rs if r["default"]}
        if set(default_ms) != set(dtypes):
            continue
        by_cfg = {}
        for r in rs:
            by_cfg.setdefault(_cfg_name(r), {})[r["dtype"]] = r
        scored = [(sum(c[d]["median_ms"] / default_ms[d] for d in dtypes) / len(dtypes), name, c)
                  for name, c in by_cfg.items() if set(c) == set(dtypes)]
        score, name, chosen = min(scored, key=lambda s: s[0])
        noise = max(spread.get((kernel, r["head_dim"], r["dtype"]), 0.0) for r in rs)
        default_name = _cfg_name(next(r for r in rs if r["default"]))
        if 1 / score <= 1 + max(0.02, 2 * noise):
            chosen, name = by_cfg[default_name], default_name
        first = chosen[dtypes[0]]
        entry = attn._LAUNCH[(kernel, block_d, cls)]  # its chunk and split were kept in every candidate
        extra = (f", chunk={entry.chunk}" if entry.chunk else "") + (", split=True" if entry.split else "")
        figures = ", ".join(f"{d} {chosen[d]['median_ms']:.3f} ms {default_ms[d] / chosen[d]['median_ms']:.2f}x"
                            for d in dtypes)
        verdict = "kept" if name == default_name else f"was {default_name}"
        lines.append(f'    ("{kernel}", {block_d}, "{cls}"): _Launch({first["BLOCK_M"]}, {first["BLOCK_N"]}, '
                     f'{first["num_warps"]}, {first["num_stages"]}{extra}),  # {device}: {figures}; {verdict}')
    return lines


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _list(cast):
    return lambda text: tuple(cast(x) for x in text.split(",") if x)


def _default_out(device: torch.device) -> str:
    name = harness.device_info(device)["device"]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return os.path.join(RESULTS, f"tune-{slug}-{datetime.date.today().isoformat()}.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape, two candidates per kernel (plumbing check)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/tune-<device>-<date>.json)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no candidate starts after this (default 420)")
    parser.add_argument("--compile-share", type=float, default=0.5,
                        help="fraction of the budget the compile phase may take (default 0.5)")
    parser.add_argument("--jobs", type=int, help="compile worker processes; 0: compile while timing")
    parser.add_argument("--kernels", type=_list(str), default=TUNED_KERNELS, help="comma list of fwd, dkdv, dq")
    parser.add_argument("--head-dims", type=_list(int), help="comma list (default 64,128,256)")
    parser.add_argument("--dtypes", type=_list(str), help="comma list of bfloat16, float16, float32, tf32")
    parser.add_argument("--warmup-ms", type=float, default=10.0, help="do_bench warm-up (default 10 ms)")
    parser.add_argument("--rep-ms", type=float, default=50.0, help="do_bench repetitions (default 50 ms)")
    parser.add_argument("--suggest", metavar="JSON", help="print _LAUNCH entries proposed by a recorded run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker()
        return 0
    if args.suggest:
        with open(args.suggest) as f:
            print("\n".join(suggest(json.load(f))))
        return 0
    for k in args.kernels:
        if k not in TUNED_KERNELS:
            parser.error(f"--kernels: {k!r}; expected some of {', '.join(TUNED_KERNELS)}")
    for d in args.dtypes or ():
        if d not in AGREE:
            parser.error(f"--dtypes: {d!r}; expected some of {', '.join(AGREE)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out = args.out or _default_out(device)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: workers killed, JSON kept
    payload = tune(args)
    print_table(payload["groups"])
    first = sorted(r["first_run_s"] for r in payload["rows"] if r["precompiled"] and r["first_run_s"] is not None)
    if first:  # seconds on a compile-cache hit; a compile when the workers' kernels were not reused
        print(f"\nfirst run of precompiled candidates: median {first[len(first) // 2]:.2f} s, max {first[-1]:.2f} s")
    print(f"{len(payload['rows'])} rows in {payload['info'].get('elapsed_s', 0):.0f} s -> {args.out}")
    lines = suggest(payload)
    if lines:
        print("\nproposed _LAUNCH entries (kernels/attention.py):")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
