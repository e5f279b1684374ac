"""``attnsr tune``: measure attnsr on the GPU it runs on, once, and keep what was measured.

    attnsr tune [--quick] [--budget-s 600] [--ops attention,window,gates] [--out PATH] [--device cuda:0]

Two things are measured, per *case* (an op, a dtype, a shape, and a mode: "train" = forward and
backward, "infer" = forward alone):

1. **Launch settings** of the fused attention and window kernels (attention: fwd and the one-pass
   backward, bwd; window: fwd, dkdv (which also sums the bias table's gradient and, where one key
   block covers the window, forms dQ), dq). Candidates: BLOCK_M, BLOCK_N ∈ {16, 32, 64, 128}, num_warps ∈ {4, 8},
   num_stages ∈ {1, 2, 3}, and for the backward kernels at a padded head dim of 64 or more the
   head dim read in 16-wide chunks or held whole; less those whose streamed tiles overflow the
   device's shared memory or whose fp32 accumulators alone take more than half of a thread's 255
   registers, and tiles larger than a window. The shipped setting runs first, then the others,
   nearest to it first, as many as the budget allows. Each candidate runs once with its fresh
   outputs poisoned (NaN) and its compiled kernels recorded, and must pass:
   - the compile gate on this device: no spills (ptxas's count), no tf32 wgmma with N = 8 (it
     reads past shared memory, triton-lang/triton#10629), fits the device (else Triton refuses it);
   - numerics: its outputs within the dtype's bound (``attnsr.tolerances.TUNE_AGREE``) of the
     shipped setting's, so a tuned setting never changes results beyond the dtype's rounding.
   Then it is timed (``triton.testing.do_bench``, median): the forward alone for "fwd", the
   forward and backward for the others (the other kernels at their shipped settings). The fastest
   is kept for the kernel's shape class (``attnsr.kernels._tuned``) when it beats the shipped
   setting by more than 3%.
2. **``auto``'s choice** for the case's shape class (``attnsr.backends.auto_key``): the op through
   the fused kernels (with the settings of step 1) and through the ``torch`` path, timed
   interleaved (round-robin, five rounds, medians). ``triton`` is recorded only where it is faster
   by more than 3%; otherwise ``torch``: ``auto`` never makes a user slower than the torch path.

The results go to ``attnsr.kernels._tuned.cache_file(device)`` (one file per GPU model and Triton
version, under ``$ATTNSR_CACHE_DIR`` or ``~/.cache/attnsr``), merged with what an earlier run
measured for other shape classes, written atomically; the kernels and ``auto`` read it at their
next launch. Nothing is timed inside a CUDA-graph capture or a torch.compile trace (refused).

On a machine without a GPU there is nothing to time: ``run`` takes a ``timer`` (the tests pass a
stub, with Triton's interpreter running the kernels) and the command refuses.
"""

import contextlib
import dataclasses
import datetime
import importlib
import itertools
import sys
import time

import torch

from attnsr.tolerances import TUNE_AGREE, rel_error

MARGIN = 1.03  # a measured choice must beat the shipped one by more than 3% to replace it


@dataclasses.dataclass(frozen=True)
class Case:
    op: str  # "attention", "window", "channel_gate", "spatial_gate", "cbam_gate", "layer_fusion"
    dtype: str  # "bfloat16", "float16", "float32", "tf32" (fp32 with tf32 allowed, as PyTorch's flag)
    shape: tuple  # attention (B, C, H, W, heads, patch); window (B, H, W, C, heads, window, shift);
    #                gates (B, C, H, W); layer_fusion (L, B, C, H, W)
    mode: str  # "train" or "infer"

    @property
    def name(self) -> str:
        return f"{self.op} {self.dtype} {'x'.join(map(str, self.shape))} {self.mode}"


def _cases(op, dtypes_modes, *shapes):
    return [Case(op, d, s, m) for s in shapes for d, m in dtypes_modes]


_BOTH = (("bfloat16", "train"), ("bfloat16", "infer"), ("float32", "train"), ("float32", "infer"))
_TRAIN = (("bfloat16", "train"), ("float32", "train"))
# The headline cases of the H200 run, as SR and inpainting networks run them.
CASES = (
    _cases("attention", _BOTH, (4, 64, 64, 64, 1, 1), (1, 128, 128, 128, 1, 1))  # D 64 N 4096; D 128 N 16k B·H 1
    + _cases("attention", (*_TRAIN, ("float32", "infer"), ("tf32", "infer")), (16, 64, 32, 32, 1, 1))  # small maps
    + _cases("attention", _TRAIN, (4, 128, 64, 64, 2, 1), (4, 64, 64, 64, 1, 2))  # two heads; 2×2 patches (D 256)
    + _cases("window", (*_TRAIN, ("float32", "infer")), (16, 64, 64, 180, 6, 16, 8))  # HAT's HAB
    + _cases("window", _TRAIN, (16, 48, 48, 180, 6, 8, 4))  # SwinIR
    + _cases("cbam_gate", (*_TRAIN, ("bfloat16", "infer")), (4, 128, 256, 256))
    + _cases("channel_gate", _TRAIN, (16, 64, 64, 64))  # RCAN's channel attention
    + _cases("spatial_gate", _TRAIN, (4, 128, 128, 128))
    + _cases("layer_fusion", _TRAIN, (3, 4, 64, 128, 128))
)
QUICK_CASES = (
    _cases("attention", _TRAIN, (4, 64, 64, 64, 1, 1))
    + _cases("attention", (("bfloat16", "train"),), (1, 128, 128, 128, 1, 1))
    + _cases("attention", (("float32", "train"),), (4, 64, 64, 64, 1, 2))
    + _cases("window", _TRAIN, (16, 64, 64, 180, 6, 16, 8))
    + _cases("cbam_gate", (("bfloat16", "train"),), (4, 128, 256, 256))
    + _cases("channel_gate", (("float32", "train"),), (16, 64, 64, 64))
)
OPS = {"attention": ("attention",), "window": ("window",),
       "gates": ("cbam_gate", "channel_gate", "spatial_gate", "layer_fusion")}

GRID = dict(BLOCK_M=(16, 32, 64, 128), BLOCK_N=(16, 32, 64, 128), num_warps=(4, 8), num_stages=(1, 2, 3))
# attention: the forward and the one-pass backward, the kernels a call runs by default (the
# deterministic backward's dkdv / dq settings are not tuned: they run only under
# torch.use_deterministic_algorithms(True))
KERNELS = {"attention": ("fwd", "bwd"), "window": ("fwd", "dkdv", "dq")}


# ----------------------------------------------------------------------------------------------
# Cases as calls
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def precision(dtype_name: str):
    """fp32 dot products in tf32 for the "tf32" cases (as ``allow_tf32 = True`` would), else as is
    (also the developers' tuner's, benchmarks/tune.py)."""
    if dtype_name != "tf32":
        yield
        return
    matmul = torch.backends.cuda.matmul
    attr = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, attr)
    setattr(matmul, attr, "tf32" if attr == "fp32_precision" else True)
    try:
        yield
    finally:
        setattr(matmul, attr, before)


class _Calls:
    """A case on a device: ``run(backend)`` -> the outputs that a candidate must reproduce (the
    forward's output; in "train" mode the input gradients too), with the inputs made once."""

    def __init__(self, case: Case, device: torch.device):
        self.case = case
        dtype = torch.float32 if case.dtype == "tf32" else getattr(torch, case.dtype)
        gen = torch.Generator("cpu").manual_seed(0)

        def randn(*shape, grad=None):
            t = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
            return t.requires_grad_(case.mode == "train" if grad is None else grad)

        from attnsr import backends

        s = case.shape
        if case.op == "attention":
            b, c, h, w, heads, patch = s
            qkv = randn(b, 3 * c, h, w)
            self.inputs = (qkv,)
            self.fn = lambda be: backends.image_attention(*qkv.split(c, 1), heads=heads, patch_size=patch,
                                                          backend=be)
        elif case.op == "window":
            b, h, w, c, heads, window, shift = s
            qkv = randn(b, h * w, 3 * c)
            table = (torch.randn((2 * window - 1) ** 2, heads, generator=gen) * 0.1).to(device)
            table.requires_grad_(case.mode == "train")
            self.inputs = (qkv, table)
            self.fn = lambda be: backends.window_attention(*qkv.view(b, h, w, 3 * c).split(c, -1),
                                                           window_size=window, shift_size=shift, heads=heads,
                                                           bias_table=table, backend=be)
        elif case.op in ("channel_gate", "spatial_gate", "cbam_gate"):
            b, c, h, w = s
            x = randn(b, c, h, w)
            r = max(1, c // 16)
            w1, b1, w2, b2 = randn(r, c) * 0.3, randn(r), randn(c, r) * 0.3, randn(c)
            sw, sb = randn(1, 2, 7, 7) * 0.1, randn(1)
            params = (w1, b1, w2, b2, sw, sb)
            for p in params:
                p.detach_().requires_grad_(case.mode == "train")
            self.inputs = (x, *params)
            if case.op == "channel_gate":
                self.fn = lambda be: backends.channel_gate(x, w1, b1, w2, b2, backend=be)
            elif case.op == "spatial_gate":
                self.fn = lambda be: backends.spatial_gate(x, sw, sb, backend=be)
            else:
                self.fn = lambda be: backends.cbam_gate(x, w1, b1, w2, b2, sw, sb, backend=be)
        elif case.op == "layer_fusion":
            n, b, c, h, w = s
            maps = [randn(b, c, h, w) for _ in range(n)]
            weights = torch.softmax(randn(b, n, grad=False), 1).requires_grad_(case.mode == "train")
            self.inputs = (*maps, weights)
            self.fn = lambda be: backends.layer_fusion(maps, weights, backend=be)
        else:
            raise ValueError(f"attnsr tune: unknown op {case.op!r}")
        self.grad_out = None

    def run(self, backend: str):
        with precision(self.case.dtype):
            if self.case.mode == "infer":
                with torch.no_grad():
                    return (self.fn(backend),)
            out = self.fn(backend)
            if self.grad_out is None:
                self.grad_out = torch.randn_like(out)
            wanted = [t for t in self.inputs if t.requires_grad]
            grads = torch.autograd.grad(out, wanted, self.grad_out, allow_unused=True)  # a gate's unused weights
            return (out.detach(), *(g for g in grads if g is not None))

    def forward_only(self, backend: str):
        with precision(self.case.dtype), torch.no_grad():
            return (self.fn(backend),)

    def key(self) -> str:
        """``auto``'s shape class of the case (what ``attnsr.backends`` computes for the call)."""
        from attnsr import backends

        c, s = self.case, self.case.shape
        with precision(c.dtype):
            x = self.inputs[0]
            if c.op == "attention":
                b, ch, h, w, heads, p = s
                return backends.auto_key("attention", x, head_dim=ch // heads * p * p, tokens=(h // p) * (w // p),
                                         batch_heads=b * heads, patch=p, mode=c.mode)
            if c.op == "window":
                b, h, w, ch, heads, window, _ = s
                return backends.auto_key("window", x, head_dim=ch // heads, tokens=window * window, mode=c.mode)
            if c.op == "layer_fusion":
                _, b, ch, h, w = s
                return backends.auto_key("layer_fusion", self.inputs[-1], tokens=ch * h * w, mode=c.mode)
            b, ch, h, w = s
            return backends.auto_key(c.op, x, head_dim=ch, tokens=h * w, mode=c.mode)


# ----------------------------------------------------------------------------------------------
# Launch candidates
# ----------------------------------------------------------------------------------------------


def _kernel_module(op: str):
    """The module of the op's kernels (``attnsr.kernels`` exports functions of the same names)."""
    name = "attention" if op == "attention" else "window_attention"
    return importlib.import_module(f"attnsr.kernels.{name}")


def _geometry(case: Case):
    """(head dim, tokens of a launch's sequence, batch × heads, patch the kernels address) of an
    attention or window case: patches run packed into sequences (``attnsr.kernels.pack``), so p = 1."""
    s = case.shape
    if case.op == "attention":
        b, c, h, w, heads, p = s
        return c // heads * p * p, (h // p) * (w // p), b * heads, 1
    b, h, w, c, heads, window, _ = s
    return c // heads, window * window, 0, 1


def launch_key(case: Case, kernel: str) -> str:
    """The shape-class key under which the launchers look the case's ``kernel`` up."""
    from attnsr.kernels import _runtime, _tuned

    dtype = torch.float32 if case.dtype == "tf32" else getattr(torch, case.dtype)
    with precision(case.dtype):
        dots = _runtime.dot_precision(dtype)
    head_dim, tokens, batch_heads, patch = _geometry(case)
    block_d = max(16, _runtime.next_pow2(head_dim))
    if case.op == "attention":
        return _tuned.attention_key(kernel, block_d, dtype, dots, patch, tokens, batch_heads)
    return _tuned.window_key(kernel, block_d, dtype, dots, tokens)


def shipped_setting(case: Case, kernel: str, device: torch.device) -> dict:
    """The setting the launcher takes for the case's kernel without a tuned table (None: the
    table has no one-pass backward for the case)."""
    from attnsr.kernels import _tuned

    module = _kernel_module(case.op)
    dtype = torch.float32 if case.dtype == "tf32" else getattr(torch, case.dtype)
    head_dim, tokens, _, patch = _geometry(case)
    saved = _tuned._TABLES.get(_tuned._key(device))
    _tuned.use(device, {})  # as shipped
    try:
        with precision(case.dtype):
            if case.op == "attention":
                config = module._config(kernel, head_dim, dtype, patch, None, None)
            else:
                config = module._config(kernel, head_dim, dtype, tokens, None)
    finally:
        _tuned.use(device, saved)
    if config is None:  # no one-pass backward shipped for the case (its calls take the deterministic one)
        return None
    blocks, launch = config
    cfg = {"BLOCK_M": blocks["BLOCK_M"], "BLOCK_N": blocks["BLOCK_N"]}
    cfg.update({k: v for k, v in launch.items() if k in ("num_warps", "num_stages")})
    cfg["BLOCK_DC"] = blocks.get("BLOCK_DC", 0)
    if kernel in ("bwd", "dkdv") and case.op == "attention":
        cfg["SPLIT"] = int(blocks.get("PART", (0,)) != (0,))
    if "DQ" in blocks:  # window dK/dV: whether it also forms dQ where one key block covers the window
        cfg["DQ"] = blocks["DQ"]
    return cfg


def candidates(case: Case, kernel: str, shipped: dict, smem_limit: int, most: int) -> list:
    """The shipped setting, then the grid's settings that fit, nearest to the shipped one first."""
    from attnsr.kernels import _runtime

    head_dim, tokens, _, _ = _geometry(case)
    block_d = max(16, _runtime.next_pow2(head_dim))
    elt = 2 if case.dtype in ("bfloat16", "float16") else 4
    chunks = (0, 16) if kernel != "fwd" and block_d >= 64 else (0,)
    found = []
    for bm, bn, warps, stages, chunk in itertools.product(*GRID.values(), chunks):
        if case.op == "window" and (bm > max(16, _runtime.next_pow2(tokens)) or
                                    bn > max(16, _runtime.next_pow2(tokens))):
            continue  # a tile larger than the window
        streamed = bm if kernel in ("bwd", "dkdv") else bn
        if 2 * streamed * (chunk or block_d) * elt * stages > smem_limit:
            continue
        held = 2 * bn if kernel in ("bwd", "dkdv") else bm
        if held * block_d / (32 * warps) > 128:  # fp32 accumulators alone, per thread
            continue
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, BLOCK_DC=chunk)
        if "SPLIT" in shipped:
            cfg["SPLIT"] = shipped["SPLIT"] if chunk else 0
        if "DQ" in shipped:
            cfg["DQ"] = shipped["DQ"]
        if cfg != shipped:
            found.append(cfg)
    found.sort(key=lambda c: (sum(c[k] != shipped.get(k) for k in c), c["BLOCK_M"], c["BLOCK_N"], c["num_warps"],
                              c["num_stages"]))
    return [shipped, *found[:max(0, most - 1)]]


TF32_N8 = "wgmma.mma_async.sync.aligned.m64n8k8.f32.tf32.tf32"


def gate(record: list):
    """Why the kernels a candidate launched must not be used on this device, or None. ``record``:
    what ``attnsr.kernels._runtime.recorded_launches`` collected (compiled kernels, loaded)."""
    for kernel, _, _ in record:
        name = getattr(kernel, "name", "kernel")
        spills = getattr(kernel, "n_spills", 0) or 0
        if spills:
            return f"gate: {name} spills ({spills} registers)"
        if TF32_N8 in (getattr(kernel, "asm", {}) or {}).get("ptx", ""):
            return f"gate: {name} issues tf32 wgmma with N = 8 (triton-lang/triton#10629)"
    return None


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def gpu_timer(fn, rep_ms: float = 40) -> float:
    """Median milliseconds of ``fn`` on the GPU (warm-up, L2 flushed between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))


def _refuse_where_timing_lies() -> None:
    if torch.compiler.is_compiling():
        raise RuntimeError("attnsr tune: called inside a torch.compile trace; run it eagerly")
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("attnsr tune: called inside a CUDA-graph capture; run it outside")


_NOT_MEASURED = object()


def _tune_kernel(calls: _Calls, kernel: str, device, timer, gate_fn, smem_limit, most, deadline, rows, log):
    """The fastest correct setting of one kernel for the case, None (the shipped one is best), or
    ``_NOT_MEASURED`` (the budget ran out before the shipped setting was timed)."""
    from attnsr.kernels import _runtime

    case = calls.case
    module = _kernel_module(case.op)
    shipped = shipped_setting(case, kernel, device)
    if shipped is None:
        log(f"  {case.name} {kernel}: no shipped setting (such calls run the deterministic backward); not tuned")
        return None
    timed = calls.forward_only if kernel == "fwd" else calls.run
    reference, best, shipped_ms = None, None, None
    for cfg in candidates(case, kernel, shipped, smem_limit, most):
        if time.monotonic() > deadline:
            rows.append(dict(case=case.name, kernel=kernel, setting=cfg, status="not run: budget"))
            continue
        settings = {k: v for k, v in cfg.items() if not (k == "SPLIT" and case.op == "window")}
        row = dict(case=case.name, kernel=kernel, setting=cfg)
        try:
            with module._launch_override(kernel, **settings):
                _runtime.POISON[0] = True
                try:
                    with _runtime.recorded_launches() as record:
                        outputs = timed("triton")
                finally:
                    _runtime.POISON[0] = False
                why = gate_fn(record)
                if why is None and reference is None:  # the shipped setting: the reference of the others
                    reference = [t.detach().clone() for t in outputs]
                elif why is None:
                    err = max(rel_error(o, r) for o, r in zip(outputs, reference))
                    if not err <= TUNE_AGREE[case.dtype]:
                        why = f"wrong: {err:.1e} from the shipped setting's outputs"
                if why is None:
                    row["ms"] = timer(lambda: timed("triton"))
                    row["status"] = "ok"
                else:
                    row["status"] = why
        except Exception as e:  # a compile error, out of resources: a row, never a crash
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        rows.append(row)
        if cfg is shipped:
            if row.get("status") != "ok":
                log(f"  {case.name} {kernel}: the shipped setting fails here ({row['status']}); not tuned")
                return _NOT_MEASURED
            shipped_ms = row["ms"]
        elif row.get("status") == "ok" and (best is None or row["ms"] < best[1]):
            best = (cfg, row["ms"])
    if best is not None and best[1] * MARGIN < shipped_ms:
        log(f"  {case.name} {kernel}: {_fmt(best[0])} {best[1]:.3f} ms, shipped {_fmt(shipped)} {shipped_ms:.3f} ms")
        return best[0]
    if shipped_ms is None:
        return _NOT_MEASURED
    log(f"  {case.name} {kernel}: the shipped setting {_fmt(shipped)} stays ({shipped_ms:.3f} ms)")
    return None


def _fmt(cfg: dict) -> str:
    text = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}/w{cfg.get('num_warps', '-')}/s{cfg.get('num_stages', '-')}"
    if cfg.get("BLOCK_DC"):
        text += f"/c{cfg['BLOCK_DC']}"
    if cfg.get("SPLIT"):
        text += "/split"
    if cfg.get("DQ") == 0:
        text += "/dq-pass"
    return text


def _choose_backend(calls: _Calls, timer, rows, log, rounds: int = 5) -> str:
    """``triton`` where the fused op is faster than the torch path by more than ``MARGIN``, timed
    interleaved; else ``torch``."""
    times = {"triton": [], "torch": []}
    for be in times:
        calls.run(be)  # warm-up: compile, plans, caches
    for _ in range(rounds):
        for be in times:
            times[be].append(timer(lambda be=be: calls.run(be)))
    fused, plain = sorted(times["triton"])[rounds // 2], sorted(times["torch"])[rounds // 2]
    choice = "triton" if fused * MARGIN < plain else "torch"
    rows.append(dict(case=calls.case.name, kernel="auto", key=calls.key(), triton_ms=fused, torch_ms=plain,
                     status=choice))
    log(f"  {calls.case.name}: fused {fused:.3f} ms, torch {plain:.3f} ms -> auto takes {choice}")
    return choice


def run(cases=CASES, device=None, timer=None, gate_fn=gate, budget_s: float = 600, most: int = 24,
        out: str | None = None, log=None) -> dict:
    """Tune ``cases`` on ``device``; write and return the table (see the module docstring).

    ``timer``: (fn) -> median ms; the GPU's by default (a CPU run must pass one: the tests' stub).
    ``most``: candidates per kernel and case, the shipped one included. ``out``: the table's path
    (default ``attnsr.kernels._tuned.cache_file(device)``)."""
    from attnsr.kernels import _tuned

    _refuse_where_timing_lies()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:  # the current GPU, named by its index
        device = torch.device("cuda", torch.cuda.current_device())
    if timer is None:
        if device.type != "cuda":
            raise RuntimeError("attnsr tune: there is no GPU to time on this machine; run it where the model trains")
        timer = gpu_timer
    if device.type == "cuda":
        torch.cuda.set_device(device)
        smem_limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    else:
        smem_limit = 227 * 1024
    path = out or _tuned.cache_file(device)
    table = dict(_tuned._read(path)) or {}
    table.setdefault("launch", {})
    table.setdefault("backend", {})
    rows = []
    start = time.monotonic()
    deadline = start + budget_s
    # launch settings first (the auto timing uses them), each kernel's shape class once
    done = set()
    tunable = [c for c in cases if c.op in KERNELS]
    for n, case in enumerate(tunable):
        calls = _Calls(case, device)
        kernels = KERNELS[case.op] if case.mode == "train" else ("fwd",)
        for kernel in kernels:
            key = launch_key(case, kernel)
            if key in done:
                continue
            done.add(key)
            share = start + (deadline - start) * 0.8 * (n + 1) / len(tunable)  # 80% of the budget, case by case
            best = _tune_kernel(calls, kernel, device, timer, gate_fn, smem_limit, most, min(share, deadline), rows,
                                log)
            if best is _NOT_MEASURED:  # what an earlier run measured for this class stays
                continue
            if best is not None:
                table["launch"][key] = best
            else:  # the shipped setting was measured fastest (or alone correct): an older entry goes
                table["launch"].pop(key, None)
        _apply(table, device)  # the next cases and the auto timing run with what was found
    for case in cases:
        if time.monotonic() > deadline:
            rows.append(dict(case=case.name, kernel="auto", status="not run: budget"))
            continue
        calls = _Calls(case, device)
        table["backend"][calls.key()] = _choose_backend(calls, timer, rows, log)
    table.update(format=_tuned.FORMAT, rows=rows, info=_info(device, time.monotonic() - start))
    _tuned.write(path, table)
    log(f"attnsr tune: wrote {path}")
    return table


def _apply(table: dict, device: torch.device) -> None:
    """Make the table in progress the device's current one (plans recorded before are dropped)."""
    from attnsr.kernels import _tuned

    _tuned.use(device, dict(table, format=_tuned.FORMAT))


def _info(device: torch.device, seconds: float) -> dict:
    import triton

    info = dict(device=str(device), torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat(), seconds=round(seconds, 1))
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return info


def main(argv=None, prog: str = "attnsr tune") -> int:
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].strip("`: "))
    p.add_argument("--quick", action="store_true", help="the headline cases only, 6 candidates per kernel")
    p.add_argument("--budget-s", type=float, default=None, help="seconds in all (default 600; quick 240)")
    p.add_argument("--ops", default="attention,window,gates", help="some of attention, window, gates")
    p.add_argument("--out", default=None, help="the table's path (default: the cache file the kernels read)")
    p.add_argument("--device", default=None, help="cuda or cuda:N (default: the current GPU)")
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        p.error(f"--ops: {', '.join(unknown)}; expected some of {', '.join(OPS)}")
    wanted = {op for o in ops for op in OPS[o]}
    cases = [c for c in (QUICK_CASES if args.quick else CASES) if c.op in wanted]
    budget = args.budget_s if args.budget_s is not None else (240 if args.quick else 600)
    try:
        table = run(cases, device=args.device, budget_s=budget, most=6 if args.quick else 24, out=args.out)
    except (RuntimeError, ValueError) as e:
        print(f"{prog}: error: {str(e).removeprefix('attnsr tune: ')}", file=sys.stderr)
        return 2
    print(format_table(table))
    return 0


def format_table(table: dict) -> str:
    """What the run chose: tuned launch settings and auto's choices."""
    lines = ["launch settings measured on this device (shape class: setting)"]
    lines += [f"  {k}: {_fmt(v)}" for k, v in sorted(table.get("launch", {}).items())] or ["  (the shipped ones)"]
    lines.append("auto's choice (shape class: backend)")
    lines += [f"  {k}: {v}" for k, v in sorted(table.get("backend", {}).items())]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
