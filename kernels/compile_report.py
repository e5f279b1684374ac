"""What a GPU would run, seen without one: every kernel the public ops launch, compiled for sm_90
(H100 / H200) and sm_80 (A100) on any machine, with its registers, spills, shared memory,
tensor-core instructions, load widths and TMA use.

    python -m attnsr.kernels.compile_report [--arch 90,80] [--cases all|gate|REGEX] [--jobs N]
                                            [--json PATH] [--gate]
    python -m attnsr.kernels.compile_report --compare BEFORE.json AFTER.json

How. A stand-in for Triton's GPU driver answers "the current device is an sm_<arch> GPU", and
Triton's own JIT path (``JITFunction.run``) runs in compile-only mode (``warmup=True``): each case
calls the public ops (forward, then backward) on small CPU tensors, and every kernel launch they
make is compiled for the target instead of launched. So the specialisation is that of a real
launch: integer arguments equal to 1 become constants, 16-divisible integers and pointers are
marked so, and the launch configuration is the one a GPU run looks up. The outputs of the ops are
never computed (their memory is left as allocated); only the compiled kernels are kept.

Each compiled kernel is read with the tools the triton wheel ships in
``triton/backends/nvidia/bin``: ``cuobjdump -res-usage`` (REG registers per thread, STACK bytes of
local memory per thread: spills) and ``nvdisasm`` (the SASS: HGMMA = wgmma, the Hopper warp-group
tensor-core instruction; HMMA = mma.sync, the Ampere one; STL / LDL = spill stores and loads;
LDG / LDGSTS = global loads, ``.128`` the 16-byte wide ones; UTMALDG = TMA loads). Shared memory
is Triton's own figure (``metadata.shared``, bytes per program).

Cases cover every dtype (fp32 under each precision a call can get, fp16, bf16, float64), head dims
16, 30, 64, 128 and 256, pixels and 2×2 patches, NCHW, channels_last, q/k/v split from one fused
conv output, (B, H, N, D) sequences, and the gating ops (channel, spatial, CBAM, layer fusion) in
NCHW and channels_last, on 16×16 maps by default; ``--cases wide`` the shapes users run (odd
maps, 2×2 patches at head dims 128 and 256, window attention at head dim 128 and on maps that are
not multiples of 16, the gating ops at the benchmark shapes: a case carries its map size, and
Triton specialises on 16-divisible strides). ``--cases gate`` is the subset
``tests/test_compile_report.py`` runs: one case per launch-table entry and per gating kernel and
dtype class, and the wide cases that pass (``WIDE_PENDING``: those that do not yet).

The gate (``--gate``; ``gate_failures``) asks of every compiled kernel: no spills on sm_90, the
target GPUs (STACK = 0, no STL; sm_80's spills are reported, not gated: one launch table serves
both, and it is chosen for Hopper); shared memory within the target's per-block limit (227 KiB on
sm_90, 163 KiB on sm_80, so that the table also launches on an A100); on
sm_90, wgmma (HGMMA, and no HMMA) in the attention kernels with dot products (forward, dK/dV, dQ)
for head dims ≤ 128 in fp16, bf16 and fp32 on tensor cores (tf32x3 and tf32; exact "ieee" fp32
runs on the FMA units by design), and in the window-attention dot kernels for head dims ≤ 64 in the
same dtypes (larger ones take a small-tile rule; window transformers use 10 to 64); no tf32
wgmma with N = 8 (PTX ``m64n8k8``: Triton leaves its
shared-memory operand unpadded and the instruction reads past it, triton-lang/triton#10629; on an
H200 it gave illegal memory accesses and silently wrong gradients); and every floating-point scalar
of a float64 kernel typed fp64.

Needs: triton ≥ 3.6 with its NVIDIA backend (the Linux wheel), torch; no GPU, no CUDA driver. Run
it with ``TRITON_INTERPRET`` unset: under the interpreter the kernels are not compiled at all.
"""

import argparse
import collections
import contextlib
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

from . import _runtime

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # opt-in shared memory per block (bytes)
ATTENTION_DOT_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_kernel", "_attn_bwd_det_kernel")
WINDOW_KERNEL_NAMES = {"fwd": "_win_fwd_kernel", "dkdv": "_win_bwd_dkdv_kernel", "dq": "_win_bwd_dq_kernel"}
WINDOW_DOT_KERNELS = tuple(WINDOW_KERNEL_NAMES.values())  # the window kernels with launch-table entries
FIELDS = ("regs", "stack", "spill_stores", "spill_loads", "shared", "hgmma", "hmma", "ldg", "ldg128", "ldg128_share",
          "tma", "wgmma_tf32_n8")
# A tf32 wgmma with N = 8 (PTX m64n8k8, what Triton emits when two warp groups split a 16-wide
# tile): Triton does not pad its shared-memory operand, and the instruction reads past it
# (triton-lang/triton#10629). Seen on an H200 (triton 3.6): the fp32 dK/dV kernel at head dim 128
# with 16×64 tiles and 8 warps raised an illegal memory access, and at head dim 108 returned
# gradients 83% off, silently; the same tiles with 4 warps (m64n16k8) were exact.
_TF32_N8 = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m64n8k8\.f32\.tf32\.tf32")


# ----------------------------------------------------------------------------------------------
# Compile-only launches through Triton's JIT
# ----------------------------------------------------------------------------------------------


class _StandInDriver:
    """The part of Triton's driver interface that the JIT's compile path asks: the target, and a
    device and stream to key its caches by. The device id is the arch, so that kernels compiled
    for sm_90 and sm_80 in one process never share a cache entry."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


@dataclasses.dataclass
class Launch:
    """One kernel as a launch compiled it."""

    kernel: str  # the @triton.jit function's name
    compiled: object  # Triton's CompiledKernel
    constants: dict  # the launch's keyword arguments: constexprs and num_warps / num_stages


@contextlib.contextmanager
def compile_only(arch: int):
    """Inside the block, every Triton kernel launch compiles for sm_<arch> and is not run; the
    public ops accept CPU tensors. Yields the list of ``Launch`` records, appended as they come."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    if _runtime.interpreting():
        raise RuntimeError(
            "compile_report: TRITON_INTERPRET is set, so the kernels are interpreted, not compiled; "
            "run it with TRITON_INTERPRET unset (no GPU is needed)"
        )
    launches = []
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        compiled = run(self, *args, grid=grid, warmup=True, **kwargs)
        constants = {k: (str(v) if not isinstance(v, (int, str)) else v) for k, v in kwargs.items()}
        launches.append(Launch(self.fn.__name__, compiled, constants))
        return compiled

    previous = driver._active  # None on a machine without a GPU driver: reset_active() would raise
    driver.set_active(_StandInDriver(arch))
    JITFunction.run = compile_instead
    _runtime.COMPILE_ONLY[0] = True
    try:
        yield launches
    finally:
        _runtime.COMPILE_ONLY[0] = False
        JITFunction.run = run
        driver._active = previous


# ----------------------------------------------------------------------------------------------
# Reading a compiled kernel
# ----------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise RuntimeError(f"compile_report: {path} not found; the triton wheel for Linux ships it")
    return path


def _scalar_types(compiled) -> dict:
    """Name -> Triton type of the kernel's non-pointer, non-constexpr arguments."""
    signature = compiled.src.signature
    return {k: v for k, v in signature.items() if v != "constexpr" and not str(v).startswith("*")}


def read_cubin(compiled) -> dict:
    """Figures of one compiled kernel (see the module header)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), path], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    ops = collections.Counter(re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass,
                                         flags=re.M))

    def count(pred):
        return sum(n for op, n in ops.items() if pred(op))

    def is_ldg(op):
        return op.startswith("LDG") and not op.startswith("LDGDEPBAR")

    ldg, ldg128 = count(is_ldg), count(lambda op: is_ldg(op) and ".128" in op)
    return dict(
        regs=int(regs.group(1)) if regs else None,
        stack=int(stack.group(1)) if stack else None,
        spill_stores=count(lambda op: op.startswith("STL")),
        spill_loads=count(lambda op: op.startswith("LDL")),
        shared=int(compiled.metadata.shared),
        hgmma=count(lambda op: op.startswith("HGMMA")),
        hmma=count(lambda op: op.startswith("HMMA")),
        ldg=ldg,
        ldg128=ldg128,
        ldg128_share=round(ldg128 / ldg, 3) if ldg else None,  # of the global load instructions, 16 bytes wide
        tma=count(lambda op: op.startswith("UTMALDG")),
        wgmma_tf32_n8=len(_TF32_N8.findall(compiled.asm["ptx"])),
    )


# ----------------------------------------------------------------------------------------------
# Cases: the public ops as a user calls them
# ----------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
# fp32 precisions a call can get: (name, torch.backends.cuda.matmul.fp32_precision, precision argument)
FP32_MODES = {"fp32": ("ieee", None), "fp32-tf32": ("tf32", None), "fp32-ieee": ("ieee", "ieee")}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    op: str  # "attention" or a gating op
    dtype: str  # a key of DTYPES or FP32_MODES
    head_dim: int = 0  # attention only
    layout: str = "nchw"  # nchw, channels_last, fused (q, k, v split from one conv output), seq
    patch: int = 1
    variant: str = ""  # gating: pool="avgmax", layer_fusion "list", ...
    # the map (H, W) the ops run on, and (batch, channels) of the gating ops' maps; the defaults
    # are the small maps the report began with (every stride a multiple of 16). Compiling needs
    # shapes only: maps of more than ``_FILL_LIMIT`` elements are allocated, not filled
    size: tuple = (16, 16)
    batch: int = 2
    channels: int = 32


DEFAULT_SIZE = Case.__dataclass_fields__["size"].default
_FILL_LIMIT = 1 << 20  # elements: above it a case's maps are torch.empty (compile-only launches read no data)


def _torch_dtype(name: str) -> torch.dtype:
    return torch.float32 if name in FP32_MODES else DTYPES[name]


@contextlib.contextmanager
def _fp32_mode(name: str):
    """PyTorch's fp32 matmul precision as the case asks; restored after."""
    matmul = torch.backends.cuda.matmul
    if name not in FP32_MODES or not hasattr(matmul, "fp32_precision"):
        yield
        return
    before = matmul.fp32_precision
    matmul.fp32_precision = FP32_MODES[name][0]
    try:
        yield
    finally:
        matmul.fp32_precision = before


def _map(shape, dtype, channels_last=False):
    x = torch.randn(shape, dtype=dtype) if _numel(shape) <= _FILL_LIMIT else torch.empty(shape, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _backward(out):
    out.backward(torch.randn_like(out) if out.numel() <= _FILL_LIMIT else torch.empty_like(out))


def _run_attention(case: Case):
    from . import attention

    dtype = _torch_dtype(case.dtype)
    extra = {}
    if case.dtype in FP32_MODES and FP32_MODES[case.dtype][1] is not None:
        extra["precision"] = FP32_MODES[case.dtype][1]
    d = case.head_dim
    if case.variant == "det":  # the deterministic backward (torch.use_deterministic_algorithms)
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            _run_attention(dataclasses.replace(case, variant=""))
        finally:
            torch.use_deterministic_algorithms(before)
        return
    if case.layout == "seq":
        q, k, v = (_map((2, 2, 64, d), dtype) for _ in range(3))
        _backward(attention.flash_attention(q, k, v, **extra))
        return
    channels = d // (case.patch * case.patch)
    h, w = case.size
    if case.layout == "fused":  # one conv output with 3·C channels, q, k, v = split(C, 1)
        qkv = _map((2, 3 * channels, h, w), dtype)
        q, k, v = qkv.split(channels, 1)
    else:
        q, k, v = (_map((2, channels, h, w), dtype, case.layout == "channels_last") for _ in range(3))
    _backward(attention.image_attention(q, k, v, patch_size=case.patch, **extra))


def _run_window(case: Case):
    """Swin window attention as SwinIR runs it: q, k, v split out of one (B, H·W, 3C) projection,
    two heads of ``head_dim``, a shifted window of ``variant`` (w8, w16) on a map two windows wide,
    the relative position bias table in fp32 (or on ``case.size`` when it is not the default: a
    map whose sides are window multiples). Variant "w16p": windows already cut, (nW·B, N, 3C),
    with an explicit (nW, N, N) mask, as attnsr.WindowAttention runs SwinIR's forward(x, mask)."""
    from . import window_attention

    dtype = _torch_dtype(case.dtype)
    heads, d, win = 2, case.head_dim, int(case.variant[1:].rstrip("p"))
    c = heads * d
    h, w = (2 * win, 2 * win) if case.size == DEFAULT_SIZE else case.size
    table = torch.randn((2 * win - 1) ** 2, heads).requires_grad_()
    if case.variant.endswith("p"):
        qkv = _map((8, win * win, 3 * c), dtype)
        q, k, v = qkv.view(8, win, win, 3 * c).split(c, -1)
        mask = torch.randn(4, win * win, win * win)
        _backward(window_attention(q, k, v, window_size=win, heads=heads, bias_table=table, mask=mask))
        return
    qkv = _map((2, h * w, 3 * c), dtype)
    q, k, v = qkv.view(2, h, w, 3 * c).split(c, -1)
    _backward(window_attention(q, k, v, window_size=win, shift_size=win // 2, heads=heads, bias_table=table))


def _run_transposed(case: Case):
    """Restormer's transposed attention (MDTA) after its convolutions: q, k, v split out of one
    (B, 3C, H, W) depthwise-conv output, ``case.channels`` channels, d = ``head_dim`` per head
    (C / d heads), NCHW or ``layout`` channels_last; forward and backward (the temperature too)."""
    from .transposed_attention import transposed_attention

    dtype = _torch_dtype(case.dtype)
    heads = case.channels // case.head_dim
    qkv = _map((case.batch, 3 * case.channels, *case.size), dtype, case.layout == "channels_last")
    temperature = torch.ones(heads, 1, 1, dtype=dtype, requires_grad=True)
    _backward(transposed_attention(*qkv.split(case.channels, 1), temperature, heads=heads))


def _transposed_case(dtype, layout="nchw", channels=48, d=48, size=(64, 64)):
    return Case(f"transposed_attention {dtype} D={d} {layout} 1x{channels}x{size[0]}x{size[1]}", "transposed_attention",
                dtype, d, layout, size=tuple(size), batch=1, channels=channels)


def _run_gating(case: Case):
    from . import cbam_gate, channel_gate, layer_fusion, spatial_gate

    dtype = _torch_dtype(case.dtype)
    channels = case.channels
    hidden = max(1, channels // 4) if channels <= 32 else channels // 16  # reduction 16 (RCAN, CBAM) on wide maps
    x = _map((case.batch, channels, *case.size), dtype, case.layout == "channels_last")

    def param(*shape):
        return torch.randn(shape, dtype=dtype).requires_grad_()

    if case.op == "channel_gate":
        y = channel_gate(x, param(hidden, channels), param(hidden), param(channels, hidden), param(channels),
                         pool=case.variant or "avg")
    elif case.op == "spatial_gate":
        y = spatial_gate(x, param(1, 2, 7, 7), param(1))
    elif case.op == "cbam_gate":
        y = cbam_gate(x, param(hidden, channels), param(hidden), param(channels, hidden), param(channels),
                      param(1, 2, 7, 7), param(1), pool="avgmax")
    elif case.op == "layer_fusion":
        maps = [x] + [_map(x.shape, dtype, case.layout == "channels_last") for _ in range(3)]
        features = maps if case.variant == "list" else torch.stack([m.detach() for m in maps]).requires_grad_()
        y = layer_fusion(features, param(case.batch, 4))
    else:
        raise ValueError(f"compile_report: unknown op {case.op!r}")
    _backward(y)


def run_case(case: Case, arch: int, override=None) -> list:
    """Compile the kernels ``case`` launches for sm_<arch>: one row per distinct compiled kernel.

    ``override``: (attention kernel, launch settings) in place of its ``_LAUNCH`` entry."""
    from .attention import _launch_override

    torch.manual_seed(0)
    settings = _launch_override(override[0], **override[1]) if override else contextlib.nullcontext()
    with _fp32_mode(case.dtype), settings, compile_only(arch) as launches:
        {"attention": _run_attention, "window_attention": _run_window,
         "transposed_attention": _run_transposed}.get(case.op, _run_gating)(case)
    rows, seen = [], set()
    for launch in launches:
        key = (launch.kernel, launch.compiled.hash)
        if key in seen:
            continue
        seen.add(key)
        consts = {k: v for k, v in launch.constants.items()
                  if k.startswith("BLOCK") or k in ("num_warps", "num_stages", "PRECISION", "K", "PART", "PROGRAMS",
                                                    "WH", "WW")}
        rows.append(dict(
            arch=arch, case=case.name, op=case.op, dtype=case.dtype, head_dim=case.head_dim, **_shape(case),
            kernel=launch.kernel, config=consts, scalars=_scalar_types(launch.compiled),
            num_warps=launch.compiled.metadata.num_warps, num_stages=launch.compiled.metadata.num_stages,
            **read_cubin(launch.compiled),
        ))
    return rows


def _shape(case: Case) -> dict:
    """The row fields that say what the case ran on: the map (H, W), and the gating maps' batch and channels."""
    shape = dict(size=list(case.size), patch=case.patch)
    if case.op not in ("attention", "window_attention"):
        shape.update(batch=case.batch, channels=case.channels)
    return shape


def _size_name(size) -> str:
    """" 45x45" for a map that is not the default (16×16), else ""."""
    return "" if tuple(size) == DEFAULT_SIZE else f" {size[0]}x{size[1]}"


def _attention_case(dtype, d, layout="fused", patch=1, size=DEFAULT_SIZE, variant=""):
    """variant "det": the backward under torch.use_deterministic_algorithms(True)."""
    name = f"attention {dtype} D={d} {layout}" + (f" p{patch}" if patch > 1 else "") + _size_name(size) + \
        (" det" if variant else "")
    return Case(name, "attention", dtype, d, layout, patch, variant, size=tuple(size))


def _window_case(dtype, d, window, size=DEFAULT_SIZE):
    """window: 8 or 16 (a shifted map, Swin's mask in the kernel), or "16p" (cut windows, a given mask);
    ``size``: the map, window multiples (default: two windows wide)."""
    return Case(f"window_attention {dtype} D={d} w{window}" + _size_name(size), "window_attention", dtype, d, "swinir",
                1, f"w{window}", size=tuple(size))


def _gating_case(op, dtype, layout, variant="", size=DEFAULT_SIZE, batch=2, channels=32):
    """``size``, ``batch``, ``channels``: the (B, C, H, W) map; a name shows them when not (2, 32, 16, 16)."""
    name = f"{op} {dtype} {layout}" + (f" {variant}" if variant else "")
    if (batch, channels) != (2, 32):
        name += f" {batch}x{channels}x{size[0]}x{size[1]}"
    else:
        name += _size_name(size)
    return Case(name, op, dtype, layout=layout, variant=variant, size=tuple(size), batch=batch, channels=channels)


def all_cases() -> list:
    cases = []
    for dtype in ("fp32", "fp32-tf32", "fp32-ieee", "fp16", "bf16", "fp64"):
        for d in (16, 30, 64, 128, 256):
            cases.append(_attention_case(dtype, d))
    for dtype in ("fp32", "bf16"):
        for layout, patch in (("nchw", 1), ("channels_last", 1), ("nchw", 2), ("channels_last", 2), ("seq", 1)):
            cases.append(_attention_case(dtype, 64, layout, patch))
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        for layout in ("nchw", "channels_last"):
            cases += [_gating_case("channel_gate", dtype, layout, "avgmax"),
                      _gating_case("spatial_gate", dtype, layout), _gating_case("cbam_gate", dtype, layout),
                      _gating_case("layer_fusion", dtype, layout), _gating_case("layer_fusion", dtype, layout, "list")]
        cases.append(_gating_case("channel_gate", dtype, "nchw", "avg"))
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        cases += [_window_case(dtype, d, w) for d in (10, 30, 64) for w in (8, 16)]
        cases += [_window_case(dtype, 30, "16p")]
    return cases


ODD = (45, 45)  # a map no block and no 16-divisibility fits (a 90×90 crop at scale 2, say)
BENCH_CBAM = dict(size=(256, 256), batch=4, channels=128)  # the gating benchmark's CBAM / channel / spatial map
BENCH_RCAN = dict(size=(64, 64), batch=16, channels=64)  # RCAN's channel gate (64 features)


def wide_cases() -> list:
    """The shapes users run beyond the 16×16 maps: odd maps (no stride divisible by 16), 2×2 patches
    at head dims 128 and 256, window attention at head dim 128 and on maps that are window
    multiples but not multiples of 16, and the gating ops at the benchmark shapes."""
    cases = []
    for dtype in ("fp32", "fp32-ieee", "fp16", "bf16", "fp64"):
        for d in (64, 128):
            cases += [_attention_case(dtype, d, layout, size=ODD) for layout in ("fused", "nchw", "channels_last")]
    for dtype in ("fp32", "bf16", "fp64"):
        cases += [_attention_case(dtype, d, size=ODD) for d in (16, 32, 256)]
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        for d in (128, 256):
            cases += [_attention_case(dtype, d, "nchw", 2), _attention_case(dtype, d, "nchw", 2, size=(46, 46))]
    for dtype in ("fp32", "bf16", "fp64"):
        cases += [_window_case(dtype, 128, w) for w in (8, 16)]
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        cases += [_window_case(dtype, 30, 8, size=(24, 24))]
    cases += [_window_case("fp32", 64, 8, size=(24, 24)), _window_case("bf16", 64, 8, size=(24, 24)),
              _window_case("bf16", 30, 16, size=(48, 48)), _window_case("fp32", 30, 16, size=(48, 48))]
    for dtype in ("fp32", "bf16"):
        cases += [_gating_case("cbam_gate", dtype, "nchw", **BENCH_CBAM),
                  _gating_case("cbam_gate", dtype, "channels_last", **BENCH_CBAM),
                  _gating_case("channel_gate", dtype, "nchw", "avgmax", **BENCH_CBAM),
                  _gating_case("spatial_gate", dtype, "nchw", **BENCH_CBAM),
                  _gating_case("channel_gate", dtype, "nchw", "avg", **BENCH_RCAN)]
    for dtype in ("fp32", "bf16", "fp64"):
        cases += [_gating_case("cbam_gate", dtype, "nchw", size=ODD),
                  _gating_case("layer_fusion", dtype, "nchw", size=ODD)]
    return cases


# Wide cases of the gate that fail it, by name, with what fails: sm_90 spills, bytes of stack per
# kernel, under triton 3.9 and 3.6. Kept out of gate_cases() until their kernels are fixed: a fixed
# case enters the gate by being deleted here; ``--cases pending --gate`` compiles them. Empty since
# 2026-12-02: odd maps (a 45×45 NCHW map, its fused-qkv views) run packed into sequences
# (attention.py's ``_aligned``), four launch entries changed for sequences whose length is not
# 16-divisible, and the 2×2-patch and window cases pass since patches are packed and windows run
# in two passes (benchmarks/results/compile-triton*-gate-2026-12-02-wide.json).
WIDE_PENDING_WHY = {}
WIDE_PENDING = [c for c in wide_cases() if c.name in WIDE_PENDING_WHY]


def gate_wide_cases(pending: bool = True) -> list:
    """The wide cases the gate compiles on sm_90 (less WIDE_PENDING unless ``pending`` is False):
    every dtype class of the attention kernels at head dims 64 and 128 on a 45×45 map (fused qkv;
    NCHW and channels_last in fp32 and bf16 at 64), 2×2 patches at head dims 128 and 256 on a 46×46
    map (23×23 patches), window attention at head dim 128 (window 8) and on a 24×24 map (window 8,
    not a multiple of 16), and the gating ops at the benchmark shapes and on a 45×45 map."""
    cases = [_attention_case(dtype, d, size=ODD) for dtype in ("fp32", "fp32-ieee", "bf16", "fp64") for d in (64, 128)]
    cases += [_attention_case("fp32", 64, "nchw", size=ODD), _attention_case("bf16", 64, "channels_last", size=ODD)]
    cases += [_attention_case(dtype, d, "nchw", 2, size=(46, 46)) for dtype in ("fp32", "bf16", "fp64")
              for d in (128, 256)]
    cases += [_window_case(dtype, 128, 8) for dtype in ("fp32", "bf16", "fp64")]
    cases += [_window_case(dtype, 30, 8, size=(24, 24)) for dtype in ("fp32", "bf16", "fp64")]
    for dtype in ("fp32", "bf16"):
        cases += [_gating_case("cbam_gate", dtype, "nchw", **BENCH_CBAM),
                  _gating_case("channel_gate", dtype, "nchw", "avgmax", **BENCH_CBAM),
                  _gating_case("spatial_gate", dtype, "nchw", **BENCH_CBAM),
                  _gating_case("channel_gate", dtype, "nchw", "avg", **BENCH_RCAN)]
    cases += [_gating_case("cbam_gate", "bf16", "channels_last", **BENCH_CBAM),
              _gating_case("cbam_gate", "bf16", "nchw", size=ODD),
              _gating_case("layer_fusion", "bf16", "nchw", size=ODD)]
    return [c for c in cases if not pending or c.name not in WIDE_PENDING_WHY]


def gate_cases() -> list:
    """(case, arch) pairs of the gate (``tests/test_compile_report.py``), meant to compile within
    about four minutes on two idle cores (docs/compile-report.md has what was measured): on sm_90,
    one case per (padded head dim, dtype class) of the
    attention launch table, which covers every entry (a case launches all four attention kernels),
    2×2 patches, exact fp32 (precision="ieee") at head dims 30, 64 and 128, and the gating kernels
    (cbam_gate launches all eight of the gates; layer_fusion its two) in every dtype class; on
    sm_80, where shared memory is smallest, the attention cases with the largest tiles (head dims
    128 and 256, 16-bit and fp32); and the wide cases of ``gate_wide_cases()`` that pass (not in
    WIDE_PENDING)."""
    work = []
    for dtype in ("fp32", "bf16", "fp64"):
        work += [(_attention_case(dtype, d), 90) for d in (16, 32, 64, 128, 256)]
    work += [(_attention_case(dtype, 64, "nchw", 2), 90) for dtype in ("fp32", "bf16")]
    work += [(_attention_case("fp32-ieee", d), 90) for d in (30, 64, 128)]  # exact fp32: FMA units, its entries
    # the deterministic backward's launch (dK/dV and dQ programs): every entry of theirs
    work += [(_attention_case(dtype, d, variant="det"), 90) for dtype in ("fp32", "bf16", "fp64")
             for d in (16, 32, 64, 128, 256)]
    work += [(_attention_case("fp32-ieee", d, variant="det"), 90) for d in (30, 64, 128)]
    # the pack kernel and the deterministic launch on odd maps (23×23 patches; 45×45 pixels)
    work += [(_attention_case("bf16", 64, "nchw", 2, size=(46, 46)), 90),
             (_attention_case("fp32-ieee", 128, size=ODD, variant="det"), 90)]
    work += [(_attention_case(dtype, d), 80) for dtype in ("fp32", "bf16") for d in (128, 256)]
    gating = [_gating_case("cbam_gate", "bf16", "nchw"), _gating_case("cbam_gate", "bf16", "channels_last"),
              _gating_case("cbam_gate", "fp32", "nchw"), _gating_case("cbam_gate", "fp64", "nchw"),
              _gating_case("layer_fusion", "bf16", "nchw", "list"),
              _gating_case("layer_fusion", "bf16", "channels_last"),
              _gating_case("layer_fusion", "fp32", "nchw", "list"), _gating_case("layer_fusion", "fp64", "nchw")]
    # Restormer's transposed attention: its first level (C = 48, one head) on an odd map, its last
    # (384 channels, 8 heads) channels_last, in each dtype class
    transposed = [_transposed_case(dtype, size=ODD) for dtype in ("fp32", "bf16", "fp64")]
    transposed += [_transposed_case(dtype, "channels_last", 384, size=(32, 32)) for dtype in ("fp32", "bf16")]
    window = [_window_case("bf16", 30, 8), _window_case("bf16", 30, 16), _window_case("fp16", 64, 16),
              _window_case("fp32", 30, 16), _window_case("fp32", 10, 8), _window_case("fp64", 30, 16),
              _window_case("bf16", 30, "16p"), _window_case("fp32", 30, "16p"), _window_case("fp32", 64, 16),
              _window_case("fp64", 64, 8)]
    return work + [(c, 90) for c in gating + window + transposed + gate_wide_cases()]


def select_work(spec: str, archs) -> list:
    """(case, arch) pairs: "all" cases on each of ``archs``, the "gate" plan (restricted to
    ``archs``), or the cases whose name matches a regular expression on each of ``archs``."""
    if spec == "gate":
        return [(c, a) for c, a in gate_cases() if a in archs]
    if spec == "wide":
        return [(c, a) for a in archs for c in wide_cases()]
    if spec == "pending":
        return [(c, a) for a in archs for c in WIDE_PENDING]
    cases = all_cases()
    if spec != "all":
        pattern = re.compile(spec)
        cases = [c for c in cases + wide_cases() + [c for c, _ in gate_cases()] if pattern.search(c.name)]
        cases = list({c.name: c for c in cases}.values())
    return [(c, a) for a in archs for c in cases]


# ----------------------------------------------------------------------------------------------
# The gate
# ----------------------------------------------------------------------------------------------


def _wants_wgmma(row) -> bool:
    if row["arch"] == 90 and row["kernel"] in WINDOW_DOT_KERNELS:  # head dims above 64: small-tile rule
        return row["dtype"] in ("fp32", "fp32-tf32", "fp16", "bf16") and 0 < row["head_dim"] <= 64
    return (row["arch"] == 90 and row["kernel"] in ATTENTION_DOT_KERNELS and 0 < row["head_dim"] <= 128
            and row["dtype"] in ("fp32", "fp32-tf32", "fp16", "bf16"))


def gate_failures(rows) -> list:
    """One line per broken expectation (see the module header), naming kernel, case and figure."""
    failures = []
    for r in rows:
        where = f"{r['kernel']} [{r['case']}, sm_{r['arch']}]"
        if r["arch"] == 90 and (r["stack"] or r["spill_stores"]):
            failures.append(f"{where}: spills: {r['stack']} B stack, {r['spill_stores']} spill stores")
        limit = SMEM_LIMIT[r["arch"]]
        if r["shared"] > limit:
            failures.append(f"{where}: shared memory {r['shared']} B > {limit} B")
        if r.get("wgmma_tf32_n8"):
            failures.append(f"{where}: {r['wgmma_tf32_n8']} tf32 wgmma with N = 8 (m64n8k8), which reads past its "
                            "shared-memory operand (triton-lang/triton#10629): wrong results or an illegal "
                            "memory access on the GPU")
        if _wants_wgmma(r) and (r["hgmma"] == 0 or r["hmma"] > 0):
            failures.append(f"{where}: not on wgmma: {r['hgmma']} HGMMA, {r['hmma']} HMMA")
        if r["dtype"] == "fp64":
            narrow = {k: v for k, v in r["scalars"].items()
                      if isinstance(v, str) and v.startswith(("fp", "bf")) and v != "fp64"}
            if narrow:
                failures.append(f"{where}: float64 kernel with narrower scalars {narrow}")
    return failures


KERNEL_NAMES = {"fwd": "_attn_fwd_kernel", "delta": "_attn_bwd_delta_kernel", "bwd": "_attn_bwd_kernel",
                "dkdv": "_attn_bwd_det_kernel", "dq": "_attn_bwd_det_kernel"}


def check_config(kernel: str, head_dim: int, dtype: str, cfg: dict, archs=(90, 80)):
    """Compile one attention kernel ("fwd", "delta", "bwd", "dkdv", "dq") with launch settings ``cfg``
    (BLOCK_M, BLOCK_N, num_warps, num_stages) for a fused-qkv NCHW map with head dim ``head_dim``
    in ``dtype`` (a key of DTYPES or FP32_MODES). Returns (rows, gate failures) of that kernel."""
    rows = []
    case = _attention_case(dtype, head_dim, variant="det" if kernel in ("dkdv", "dq") else "")  # their launch
    for arch in archs:
        rows += [r for r in run_case(case, arch, (kernel, cfg)) if r["kernel"] == KERNEL_NAMES[kernel]]
    return rows, gate_failures(rows)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _worker(args):
    case, arch = args
    try:
        return run_case(case, arch)
    except Exception as e:  # a case that fails to compile is a row, the report goes on
        return [dict(arch=arch, case=case.name, op=case.op, dtype=case.dtype, head_dim=case.head_dim, **_shape(case),
                     kernel="-", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")]


def collect(work, jobs: int = 1) -> list:
    """Rows of every (case, arch) of ``work``, compiled in ``jobs`` processes."""
    if jobs <= 1:
        return [r for w in work for r in _worker(w)]
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [r for rows in pool.map(_worker, work) for r in rows]


def _config_name(row) -> str:
    """"64×16 w4 s2": the tile sizes, warps and stages; " c16" for a head-dim chunk, " dV" / " dK" for
    the two launches of a split dK/dV."""
    cfg = row["config"]
    name = "×".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_C", "BLOCK_P") if k in cfg)
    name += f" w{row['num_warps']} s{row['num_stages']}"
    if cfg.get("BLOCK_DC"):
        name += f" c{cfg['BLOCK_DC']}"
    return name + {1: " dV", 2: " dK"}.get(cfg.get("PART"), "")


def _share(row) -> str:
    """The 128-bit share of a kernel's global loads as a percentage ("75%"), "-" without global loads
    (older reports: computed from the counts)."""
    ldg, ldg128 = row.get("ldg"), row.get("ldg128")
    return f"{round(100 * ldg128 / ldg)}%" if ldg else "-"


def format_table(rows) -> str:
    head = ("arch", "case", "kernel", "config", "regs", "stack", "STL", "shared", "HGMMA", "HMMA", "tf32 n8",
            "LDG.128/LDG", "128-bit", "TMA")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| sm_{r['arch']} | {r['case']} | - | {r['error']} |" + " |" * (len(head) - 4))
            continue
        lines.append("| " + " | ".join(str(x) for x in (
            f"sm_{r['arch']}", r["case"], r["kernel"], _config_name(r), r["regs"], r["stack"], r["spill_stores"],
            r["shared"], r["hgmma"], r["hmma"], r.get("wgmma_tf32_n8", "-"), f"{r['ldg128']}/{r['ldg']}",
            _share(r), r["tma"])) + " |")
    return "\n".join(lines)


def compare_table(before, after) -> str:
    """Rows present in both reports (same arch, case and kernel; the two launches of a split dK/dV
    each against its own part, or against the one launch of a report without the split), figures as
    "before → after"."""
    def key(r, part):  # part 0: one launch (older reports have no PART)
        return r["arch"], r["case"], r["kernel"], part

    old = {key(r, r["config"].get("PART", 0)): r for r in before if "error" not in r}
    head = ("arch", "case", "kernel", "config", "regs", "stack", "STL", "shared", "HGMMA", "HMMA", "LDG.128/LDG")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in after:
        b = None if "error" in r else old.get(key(r, r["config"].get("PART", 0)), old.get(key(r, 0)))
        if b is None:
            continue
        figures = ("regs", "stack", "spill_stores", "shared", "hgmma", "hmma")
        pairs = [(_config_name(b), _config_name(r))] + [(b[k], r[k]) for k in figures]
        pairs.append((f"{b['ldg128']}/{b['ldg']}", f"{r['ldg128']}/{r['ldg']}"))
        cells = [str(x) if x == y else f"{x} → {y}" for x, y in pairs]
        lines.append("| " + " | ".join([f"sm_{r['arch']}", r["case"], r["kernel"], *cells]) + " |")
    return "\n".join(lines)


def _default_json(cases_spec: str) -> str:
    import triton

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = os.path.join(root, "benchmarks", "results")
    if not os.path.isdir(results):
        results = os.getcwd()
    tag = cases_spec if cases_spec in ("gate", "all", "wide", "pending") else "some"
    return os.path.join(results, f"compile-triton{triton.__version__}-{tag}-{datetime.date.today()}.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnsr.kernels.compile_report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated (default 90,80)")
    parser.add_argument("--cases", default="all",
                        help="'all', 'gate', 'wide' (the shapes users run), 'pending' (WIDE_PENDING), or a "
                             "regular expression over case names")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    parser.add_argument("--json", default=None, help="where to write the rows (default benchmarks/results/...)")
    parser.add_argument("--gate", action="store_true", help="exit 1 when a kernel breaks the gate's expectations")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                        help="print two reports' common rows as before → after, compile nothing")
    args = parser.parse_args(argv)
    import triton

    if args.compare:
        before, after = (json.load(open(p))["rows"] for p in args.compare)
        print(compare_table(before, after))
        return 0

    archs = [int(a) for a in args.arch.split(",")]
    for a in archs:
        if a not in SMEM_LIMIT:
            parser.error(f"--arch {a}: expected some of {', '.join(map(str, SMEM_LIMIT))}")
    work = select_work(args.cases, archs)
    if not work:
        parser.error(f"--cases {args.cases!r} selects no case")
    rows = collect(work, args.jobs)
    print(format_table(rows))
    failures = gate_failures([r for r in rows if "error" not in r])
    failures += [f"{r['case']} [sm_{r['arch']}]: {r['error']}" for r in rows if "error" in r]
    path = args.json or _default_json(args.cases)
    info = dict(triton=triton.__version__, torch=torch.__version__, date=str(datetime.date.today()),
                archs=archs, cases=args.cases)
    with open(path, "w") as f:
        json.dump(dict(info=info, rows=rows, gate_failures=failures), f, indent=1)
    print(f"\n{len(rows)} kernels compiled (triton {triton.__version__}); rows in {path}")
    if failures:
        print(f"{len(failures)} gate failures:\n" + "\n".join(failures))
    return 1 if args.gate and failures else 0


if __name__ == "__main__":
    sys.exit(main())
