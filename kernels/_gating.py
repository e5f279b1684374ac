"""Shared pieces of the gating ops (channel_gate, spatial_gate, cbam_gate): the final pass of each.

Every gating op ends its forward with one pass that reads x and writes y, and its backward with
one pass that reads dy and writes dx. Both passes are elementwise over the (B, C, H, W) map with
per-(b, c) and per-(b, pixel) factors, so one kernel of each serves all three ops:

    forward   y  = x · ca[b, c] · s[b, p]                          (ca, s: fp32 gates; either optional)
    backward  g1 = dy · s[b, p] + dpool[b, 0, p] + [c = sarg[b, p]] · dpool[b, 1, p]
              dx = g1 · ca[b, c] + gpool[b, 0, c] + [p = carg[b, c]] · gpool[b, 1, c]

p = h·W + w is the flat pixel index. g1 is the gradient at the channel-gated map x·ca (never
stored): through the spatial gate s, and through the spatial mean (dpool[0], already divided by C)
and max (dpool[1], routed to the arg-max channel sarg). dx adds the channel gate's pooled
gradients: through the mean over pixels (gpool[0], already divided by H·W) and the max over pixels
(gpool[1], routed to the arg-max pixel carg). The spatial-only op has no ca / gpool, the
channel-only op no s / dpool, channel_gate with pool="avg" no carg.

Addressing. An element (b, c, h, w) of a map lives at base + b·s_b + c·s_c + h·s_h + w·s_w with the
map's own strides (NCHW, channels_last, views, expanded upstream gradients with stride 0). Programs
own a [BLOCK_C channels × BLOCK_P pixels] tile; the launch config picks the tile's long side along
the map's contiguous dimension. Offsets are int64. The per-(b, c) and per-(b, pixel) buffers are
small, contiguous and in the accumulator dtype: fp32, or float64 for float64 inputs.

torch.library plumbing shared by the gating ops' custom ops (each op file registers its own
``attnsr::<op>`` forward and ``attnsr::<op>_backward`` ops) is at the end of this file: the
handling of autocast and forward-mode AD in the public functions (the refusal of double backward,
shared with the attention op, is in _runtime.py). The op bodies run no PyTorch op: the spatial
gate's convolution is the output pass's prologue (``_conv_gate``), and the merges of per-program
partials run in the last program to finish (``_last_program``, ``counters``).
"""

import torch
import triton
import triton.language as tl

from ._runtime import (
    MAX_GRID_YZ,
    MAX_INDEX,
    acc_dtype,
    autocast_inputs,
    channels_innermost,
    check_no_forward_ad,
    check_runnable,
    device_guard,
    empty_map_like,
    interpreting,
    next_pow2,
    refuse_twice,
)

MAX_PIXELS = MAX_INDEX

# ----------------------------------------------------------------------------------------------
# Kernel helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pixel_offsets(p, W, s_h, s_w):
    """Offset (int64) of flat pixel p = h·W + w in a map with row stride s_h, column stride s_w.

    p < H·W < 2^31: the division and remainder run in int32 (int64 division is a long emulated
    sequence on GPUs), the products in int64."""
    return (p // W).to(tl.int64) * s_h + (p % W).to(tl.int64) * s_w


@triton.jit
def _tile_offsets(c, p, W, s_c, s_h, s_w):
    """[len(c), len(p)] offsets (int64) of channels c × flat pixels p."""
    return c.to(tl.int64)[:, None] * s_c + _pixel_offsets(p, W, s_h, s_w)[None, :]


@triton.jit
def _chunk_end(start, CHUNK, HW):
    """End of the chunk of pixels [start, start + CHUNK) cut at HW (start < HW), computed without
    start + CHUNK, which passes 2^31 for the last chunk of a map near the pixel limit (int32 wrap:
    the chunk would be skipped). The loops over it then stay below HW + BLOCK_P < 2^31."""
    return start + tl.minimum(CHUNK, HW - start)


@triton.jit
def _block_max(x, idx, NONE, AXIS: tl.constexpr):
    """Max of x along AXIS and the first index attaining it, as torch.max / torch.argmax define
    them: NaN counts as greater than every number, so a NaN is the max and the first NaN its index.

    idx: the indices along AXIS, broadcastable to x; NONE: an index above all of them (masked
    entries of x must be -inf). Explicit NaN handling: ``tl.max`` may ignore NaN on a GPU."""
    is_nan = x != x
    nan_arg = tl.min(tl.where(is_nan, idx, NONE), AXIS)
    x = tl.where(is_nan, float("-inf"), x)
    blk_max = tl.max(x, AXIS)
    blk_arg = tl.min(tl.where(x == tl.expand_dims(blk_max, AXIS), idx, NONE), AXIS)
    has_nan = nan_arg < NONE
    return tl.where(has_nan, float("nan"), blk_max), tl.where(has_nan, nan_arg, blk_arg)


@triton.jit
def _merge_max(run_max, run_arg, blk_max, blk_arg, NONE):
    """Running (max, arg-max) updated with a later block's: the later block wins only when strictly
    greater, when it holds the first NaN, or when nothing was taken yet (run_arg = NONE)."""
    run_nan = run_max != run_max
    take = ~run_nan & ((blk_max != blk_max) | (blk_max > run_max) | (run_arg == NONE))
    return tl.where(take, blk_max, run_max), tl.where(take, blk_arg, run_arg)


@triton.jit
def _through_spatial_gate(g, c, p, p_in, b, HW, S, DPOOL, SARG):
    """Gradient at the spatial gate's input from g = dy on a [channels c × pixels p] tile:
    g·s + d_mean + [c = arg-max channel]·d_max (S, SARG: (B, H·W); DPOOL: (B, 2, H·W); d_mean is
    already divided by C)."""
    s = tl.load(S + b * HW + p, mask=p_in, other=0.0)
    d_mean = tl.load(DPOOL + (2 * b) * HW + p, mask=p_in, other=0.0)
    d_max = tl.load(DPOOL + (2 * b + 1) * HW + p, mask=p_in, other=0.0)
    s_arg = tl.load(SARG + b * HW + p, mask=p_in, other=-1)
    return g * s[None, :] + d_mean[None, :] + tl.where(c[:, None] == s_arg[None, :], d_max[None, :], 0.0)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _conv_gate(STATS, WT, BIAS, b, p, H, W, HW, sw_c, sw_i, sw_j,
               HAS_BIAS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, ACC: tl.constexpr):
    """The spatial gate s = sigmoid(pre) of flat pixels p (int32, any 1-D block), with
    pre = Σ_{ch, i, j} weight[0, ch, i, j] · stat_ch[h + i − K//2, w + j − K//2] + bias (zero padding).

    STATS: (B, 2, H·W) contiguous ACC [mean, max]; WT: the (1, 2, K, K) weight with strides
    (sw_c, sw_i, sw_j), in its own dtype; BIAS: (1,). One kernel row i per loop iteration: a
    [len(p), KP] tile (KP = next power of two ≥ K), not all K² taps at once."""
    j = tl.arange(0, KP)
    ww = (p % W)[:, None] + (j - K // 2)[None, :]
    cols = (p < HW)[:, None] & (j < K)[None, :] & (ww >= 0) & (ww < W)
    h0 = p // W
    stats = STATS + (2 * b) * HW
    pre = tl.zeros(p.shape, dtype=ACC)
    for i in range(K):
        hh = h0[:, None] + (i - K // 2)
        inside = cols & (hh >= 0) & (hh < H)
        offs = hh * W + ww
        mean = tl.load(stats + offs, mask=inside, other=0.0)
        mx = tl.load(stats + HW + offs, mask=inside, other=0.0)
        w_mean = tl.load(WT + i * sw_i + j * sw_j, mask=j < K, other=0.0).to(ACC)
        w_max = tl.load(WT + sw_c + i * sw_i + j * sw_j, mask=j < K, other=0.0).to(ACC)
        pre += tl.sum(mean * w_mean[None, :] + mx * w_max[None, :], 1)
    if HAS_BIAS:
        pre += tl.load(BIAS).to(ACC)
    return 1.0 / (1.0 + tl.exp(-pre))


@triton.jit
def _last_program(COUNT, slot, programs):
    """True in the last of ``programs`` programs to arrive here that share counter ``slot``; that
    program resets the counter to 0 for the next launch. Every program must call it once, after
    storing what the last one reads (which that one loads with ``cache_modifier=".cg"``): the
    barrier orders the program's stores before its arrival, the atomic (acq_rel, device scope)
    makes them visible to the last program. Deterministic: the last program merges in a fixed
    order, whichever program it is."""
    tl.debug_barrier()
    arrived = tl.atomic_add(COUNT + slot, 1)
    last = arrived == programs - 1
    if last:
        tl.atomic_xchg(COUNT + slot, 0)
    return last


@triton.jit
def _gate_apply_kernel(
    X, Y,  # input and output maps (B, C, H, W), any strides, x dtype
    CA,  # (B, C) contiguous ACC: channel gate (read when CHANNEL)
    STATS,  # (B, 2, H·W) contiguous ACC: [mean, max] over channels (SPATIAL: the convolution's input)
    WT, BIAS,  # (1, 2, K, K) spatial weight (strides sw_*) and (1,) bias (HAS_BIAS), their own dtype
    S,  # (B, H·W) contiguous ACC, out: the spatial gate s (SPATIAL)
    sx_b, sx_c, sx_h, sx_w,  # x strides (elements)
    sy_b, sy_c, sy_h, sy_w,  # y strides
    sw_c, sw_i, sw_j,  # weight strides along its input map, rows, columns
    C, HW, W,  # channels, pixels per map, map width as the addressing sees it (PixelRun)
    MH, MW,  # the map's true height and width (the convolution's geometry)
    CHANNEL: tl.constexpr, SPATIAL: tl.constexpr,  # which gates to apply
    HAS_BIAS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,  # spatial convolution: bias, size, pow2 ≥ K
    ACC: tl.constexpr,  # arithmetic dtype: fp32 (fp64 for fp64 inputs)
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """y = x · ca · s. With SPATIAL a program owns a block of pixels and all channels (grid axis 1
    has one program): it computes s of its pixels once (the convolution and sigmoid as a prologue),
    stores it for backward, and loops over the channels; without, it owns one tile."""
    b = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_in = p < HW
    if SPATIAL:
        s = _conv_gate(STATS, WT, BIAS, b, p, MH, MW, HW, sw_c, sw_i, sw_j, HAS_BIAS, K, KP, ACC)
        tl.store(S + b * HW + p, s, mask=p_in)
        c_lo = 0
        c_hi = C
    else:
        c_lo = tl.program_id(1) * BLOCK_C
        c_hi = tl.minimum(c_lo + BLOCK_C, C)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c[:, None] < C) & p_in[None, :]
        x = tl.load(X + b * sx_b + _tile_offsets(c, p, W, sx_c, sx_h, sx_w), mask=mask, other=0.0).to(ACC)
        if CHANNEL:
            ca = tl.load(CA + b * C + c, mask=c < C, other=0.0)
            x = x * ca[:, None]
        if SPATIAL:
            x = x * s[None, :]
        tl.store(Y + b * sy_b + _tile_offsets(c, p, W, sy_c, sy_h, sy_w), x.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gate_dx_kernel(
    DY, DX,  # upstream gradient (any strides, stride 0 included) and input gradient (B, C, H, W)
    CA,  # (B, C) ACC: channel gate (CHANNEL)
    GPOOL,  # (B, 2, C) ACC: [0] gradient per element through the pixel mean (÷ H·W), [1] through the max
    CARG,  # (B, C) int32: arg-max pixel of each channel (CMAX)
    S,  # (B, H·W) ACC: spatial gate (SPATIAL)
    DPOOL,  # (B, 2, H·W) ACC: [0] gradient per element through the channel mean (÷ C), [1] through the max
    SARG,  # (B, H·W) int32: arg-max channel of each pixel (SPATIAL)
    sdy_b, sdy_c, sdy_h, sdy_w,  # dy strides (elements)
    sdx_b, sdx_c, sdx_h, sdx_w,  # dx strides
    C, HW, W,  # channels, pixels per map, map width
    CHANNEL: tl.constexpr, CMAX: tl.constexpr, SPATIAL: tl.constexpr,  # which terms exist
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    p_in = p < HW
    mask = c_in[:, None] & p_in[None, :]
    g = tl.load(DY + b * sdy_b + _tile_offsets(c, p, W, sdy_c, sdy_h, sdy_w), mask=mask, other=0.0).to(ACC)
    if SPATIAL:
        g = _through_spatial_gate(g, c, p, p_in, b, HW, S, DPOOL, SARG)
    if CHANNEL:
        ca = tl.load(CA + b * C + c, mask=c_in, other=0.0)
        g_mean = tl.load(GPOOL + (2 * b) * C + c, mask=c_in, other=0.0)
        g = g * ca[:, None] + g_mean[:, None]
        if CMAX:
            g_max = tl.load(GPOOL + (2 * b + 1) * C + c, mask=c_in, other=0.0)
            c_arg = tl.load(CARG + b * C + c, mask=c_in, other=-1)
            g += tl.where(p[None, :] == c_arg[:, None], g_max[:, None], 0.0)
    tl.store(DX + b * sdx_b + _tile_offsets(c, p, W, sdx_c, sdx_h, sdx_w), g.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------


def map_strides(t: torch.Tensor):
    return tuple(t.stride())


class PixelRun:
    """How the kernels address the pixels of the maps of one launch.

    Where every map holds its pixels in one run (row stride = W × column stride: contiguous NCHW
    and channels_last maps, their channel slices, stride-0 gradients), the kernels get W = 1 (a
    constant after Triton's specialisation) and row stride = column stride: pixel p sits at
    p·s_w with no division, and along NCHW pixels the compiler sees unit stride, so it can load
    16 bytes at a time. Otherwise the maps' own strides and W.

    ``width``: the W argument of the kernels; ``strides(t)``: the (s_b, s_c, s_h, s_w) of map t.
    """

    def __init__(self, width: int, *maps: torch.Tensor):
        self.flat = all(t.stride(-2) == t.shape[-1] * t.stride(-1) for t in maps)
        self.width = 1 if self.flat else width

    def strides(self, t: torch.Tensor):
        s = tuple(t.stride())
        return (*s[:-2], s[-1], s[-1]) if self.flat else s


def tile_config(t: torch.Tensor, loop_over_channels: bool = False):
    """(BLOCK_C, BLOCK_P, launch kwargs) for a [channels × pixels] tile of map ``t``.

    The tile is long along the map's contiguous dimension (pixels for NCHW, channels for
    channels_last). Elementwise passes and reductions over pixels (which split the pixels into
    chunks) take tiles of about 4096 elements (1024 for float64: by the compile report, the fp64
    channel statistics spill 8 bytes on sm_90 at 4096, and the NaN-aware max pooling's dot kernel
    8 bytes at 2048). Reductions over channels (``loop_over_channels``:
    one program owns a block of pixels and loops over all channels) take narrower pixel blocks so
    that B·H·W/BLOCK_P programs fill the GPU. The interpreter runs one numpy op per tile, so its
    tiles are also large, but small enough that test shapes span several tiles and chunks.
    """
    channels, hw = t.shape[1], t.shape[2] * t.shape[3]
    if interpreting():
        return min(next_pow2(channels), 16), 32, {}
    if loop_over_channels:
        if channels_innermost(t):
            return min(next_pow2(channels), 64), min(next_pow2(hw), 32), dict(num_warps=4)
        return min(next_pow2(channels), 16), min(next_pow2(hw), 128), dict(num_warps=4)
    elements = 1024 if t.element_size() > 4 else 4096
    if channels_innermost(t):
        block_c = min(next_pow2(channels), 128)
        block_p = min(next_pow2(hw), max(1, elements // block_c))
    else:
        block_p = min(next_pow2(hw), 1024)
        block_c = min(next_pow2(channels), max(1, elements // block_p))
    return block_c, block_p, dict(num_warps=4)


def check_map_limits(op: str, x: torch.Tensor, name: str = "x") -> None:
    """Shape limits shared by the gating ops: non-empty maps, grid and index ranges."""
    batch, channels, height, width = x.shape
    if channels < 1 or height < 1 or width < 1:
        raise ValueError(f"{op}: {name} is {tuple(x.shape)}; expected C, H and W of at least 1")
    if batch > MAX_GRID_YZ:
        raise ValueError(f"{op}: {name} has batch {batch}; the kernels handle at most {MAX_GRID_YZ}")
    if height * width > MAX_PIXELS:
        raise ValueError(f"{op}: {name} has H·W = {height * width} pixels; at most {MAX_PIXELS} are supported")


def gate_apply(x: torch.Tensor, ca=None, conv=None):
    """y = x · ca[b, c] · s[b, p] in one pass over x (ca: (B, C), contiguous, fp32/fp64).

    ``conv``: (stats, weight, bias) of the spatial gate (stats (B, 2, H·W) [mean, max]); s is then
    computed in the kernel and returned with y: (y, s (B, H·W)). Without it, y alone."""
    y = empty_map_like(x)
    batch, channels, height, width = x.shape
    hw = height * width
    run = PixelRun(width, x, y)
    if conv is None:
        block_c, block_p, launch = tile_config(x)
        if batch > 0:
            grid = (triton.cdiv(hw, block_p), triton.cdiv(channels, block_c), batch)
            _gate_apply_kernel[grid](
                x, y, ca, ca, ca, ca, ca, *run.strides(x), *run.strides(y), 0, 0, 0, channels, hw, run.width,
                height, width, CHANNEL=True, SPATIAL=False, HAS_BIAS=False, K=1, KP=1, ACC=acc_dtype(x.dtype),
                BLOCK_C=block_c, BLOCK_P=block_p, **launch,
            )
        return y
    stats, weight, bias = conv
    s = torch.empty((batch, hw), dtype=stats.dtype, device=x.device)
    if batch > 0:
        k = weight.shape[-1]
        block_c, block_p, launch = tile_config(x, loop_over_channels=True)
        _gate_apply_kernel[(triton.cdiv(hw, block_p), 1, batch)](
            x, y, s if ca is None else ca, stats, weight, weight if bias is None else bias, s,
            *run.strides(x), *run.strides(y), *weight.stride()[1:], channels, hw, run.width, height, width,
            CHANNEL=ca is not None, SPATIAL=True, HAS_BIAS=bias is not None, K=k, KP=next_pow2(k),
            ACC=acc_dtype(x.dtype), BLOCK_C=block_c, BLOCK_P=block_p, **launch,
        )
    return y, s


_COUNTERS = {}


def counters(device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters (one per batch element at most) for the kernels' last-program
    epilogues (``_last_program``), one buffer per device and stream: allocated on a stream's first
    call, reset by the kernels themselves, so no call fills them."""
    key = (device, torch.cuda.current_stream(device).cuda_stream) if device.type == "cuda" else device
    buf = _COUNTERS.get(key)
    if buf is None:
        buf = _COUNTERS[key] = torch.zeros(MAX_GRID_YZ + 1, dtype=torch.int32, device=device)
    return buf


def gate_dx(dy: torch.Tensor, like: torch.Tensor, *, ca=None, gpool=None, carg=None, s=None, dpool=None, sarg=None):
    """dx from dy in one pass (the formula in the header); ``like`` is x, whose layout dx copies."""
    dx = empty_map_like(like)
    batch, channels, height, width = like.shape
    if dx.numel() == 0:
        return dx
    block_c, block_p, launch = tile_config(like)
    grid = (triton.cdiv(height * width, block_p), triton.cdiv(channels, block_c), batch)
    dummy = ca if ca is not None else s
    run = PixelRun(width, dy, dx)
    _gate_dx_kernel[grid](
        dy, dx,
        dummy if ca is None else ca, dummy if gpool is None else gpool, dummy if carg is None else carg,
        dummy if s is None else s, dummy if dpool is None else dpool, dummy if sarg is None else sarg,
        *run.strides(dy), *run.strides(dx), channels, height * width, run.width,
        CHANNEL=ca is not None, CMAX=carg is not None, SPATIAL=s is not None, ACC=acc_dtype(like.dtype),
        BLOCK_C=block_c, BLOCK_P=block_p, **launch,
    )
    return dx


# ----------------------------------------------------------------------------------------------
# torch.library plumbing shared by the gating ops
# ----------------------------------------------------------------------------------------------


def prepare_inputs(op: str, *tensors):
    """First step of every public gating function: refuse forward-mode AD (dual tensors, torch.func.jvp),
    then apply the autocast rule (``_runtime.autocast_inputs``). Non-tensors (None biases, inputs
    that validation will reject) pass through unchanged."""
    check_no_forward_ad(op, *tensors)
    return autocast_inputs(*tensors)


# ----------------------------------------------------------------------------------------------
# The eager path: the op bodies called from a plain autograd.Function (custom ops under torch.compile)
# ----------------------------------------------------------------------------------------------


class EagerOp:
    """A gating op's bodies for the eager path: ``forward(*tensors, *extra)`` returns (y, *saved)
    as the custom op does; ``backward(dy, tensors_and_saved, extra, need)`` returns one gradient
    per input tensor (``need``: ``needs_input_grad`` of the tensors)."""

    __slots__ = ("backward", "custom_op", "forward", "name")

    def __init__(self, name: str, forward, backward, custom_op):
        self.name, self.forward, self.backward, self.custom_op = name, forward, backward, custom_op


class _GateFunction(torch.autograd.Function):
    """The eager path of channel_gate, spatial_gate and cbam_gate: the op bodies called directly.

    The custom ops serve torch.compile and torch.func (they carry the fake kernels and the
    compile-time autocast rule); in eager mode their dispatch costs more host time than the
    launches. Gradients of what nobody differentiates are neither computed nor zero-filled."""

    @staticmethod
    def forward(ctx, op: EagerOp, extra: tuple, *tensors):
        with device_guard(tensors[0]):
            y, *saved = op.forward(*tensors, *extra)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors, *saved)
        ctx.op, ctx.extra = op, extra
        return y

    @staticmethod
    def backward(ctx, dy):
        need = ctx.needs_input_grad[2:]
        if dy is None or not any(need):
            return (None,) * (2 + len(need))
        saved = ctx.saved_tensors
        with device_guard(dy):
            grads = ctx.op.backward(dy, saved, ctx.extra, need)
        anchor = next(t for t, n in zip(saved, need) if n)
        grads = refuse_twice(ctx.op.name, anchor, tuple(g if n else None for g, n in zip(grads, need)))
        return (None, None, *grads)


_apply = super(torch.autograd.Function, _GateFunction).apply  # Function.apply less its Python wrapper


def call_gate(op: EagerOp, tensors: tuple, extra: tuple) -> torch.Tensor:
    """One call of a checked gating op: the custom op under torch.compile and torch.func
    transforms, else the eager Function."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return op.custom_op(*tensors, *extra)[0]
    return _apply(op, extra, *tensors)


def repeat_call(calls, op: str, tensors: tuple, extra: tuple):
    """(tensors, signature, seen) of a call in ``calls`` (a ``_runtime.ValidCalls``): the tensors
    after the autocast rule (first: a call under autocast is looked up by the dtype it runs in), and
    seen True when the same signature (shapes, strides, dtypes, devices, which optional tensors are
    None, ``extra``) passed the checks before, so they can be skipped. Calls inside a forward-AD
    level are never seen (``ValidCalls.lookup``)."""
    tensors = autocast_inputs(*tensors)
    present = tuple(t for t in tensors if t is not None)
    sig, seen = calls.lookup(present, (op, *extra, *(t is None for t in tensors)))
    if seen is not None and present[0].device.type != "cuda":
        check_runnable(op, present[0].device)
    return tensors, sig, seen is not None
