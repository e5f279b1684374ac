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
autocast guard of the op bodies and the handling of autocast and forward-mode AD in the public
functions (the refusal of double backward, shared with the attention op, is in _runtime.py).
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
    empty_map_like,
    interpreting,
    next_pow2,
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
def _gate_apply_kernel(
    X, Y,  # input and output maps (B, C, H, W), any strides, x dtype
    CA,  # (B, C) contiguous ACC: channel gate (read when CHANNEL)
    S,  # (B, H·W) contiguous ACC: spatial gate (read when SPATIAL)
    sx_b, sx_c, sx_h, sx_w,  # x strides (elements)
    sy_b, sy_c, sy_h, sy_w,  # y strides
    C, HW, W,  # channels, pixels per map, map width
    CHANNEL: tl.constexpr, SPATIAL: tl.constexpr,  # which gates to apply
    ACC: tl.constexpr,  # arithmetic dtype: fp32 (fp64 for fp64 inputs)
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (c[:, None] < C) & (p[None, :] < HW)
    x = tl.load(X + b * sx_b + _tile_offsets(c, p, W, sx_c, sx_h, sx_w), mask=mask, other=0.0).to(ACC)
    if CHANNEL:
        ca = tl.load(CA + b * C + c, mask=c < C, other=0.0)
        x = x * ca[:, None]
    if SPATIAL:
        s = tl.load(S + b * HW + p, mask=p < HW, other=0.0)
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


def gate_apply(x: torch.Tensor, ca=None, s=None) -> torch.Tensor:
    """y = x · ca[b, c] · s[b, p] in one pass over x (ca: (B, C), s: (B, H·W), contiguous, fp32/fp64)."""
    y = empty_map_like(x)
    batch, channels, height, width = x.shape
    if y.numel() == 0:
        return y
    block_c, block_p, launch = tile_config(x)
    grid = (triton.cdiv(height * width, block_p), triton.cdiv(channels, block_c), batch)
    dummy = ca if ca is not None else s
    run = PixelRun(width, x, y)
    _gate_apply_kernel[grid](
        x, y, dummy if ca is None else ca, dummy if s is None else s,
        *run.strides(x), *run.strides(y), channels, height * width, run.width,
        CHANNEL=ca is not None, SPATIAL=s is not None, ACC=acc_dtype(x.dtype),
        BLOCK_C=block_c, BLOCK_P=block_p, **launch,
    )
    return y


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


def no_autocast(t: torch.Tensor):
    """Context for the body of a custom op: autocast off, so that the statistics and the small
    PyTorch MLP stay in fp32 (the dispatcher runs a custom op's body with the caller's autocast
    state, which would round the MLP's matmuls to fp16 / bf16)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def prepare_inputs(op: str, *tensors):
    """First step of every public gating function: refuse forward-mode AD (dual tensors, torch.func.jvp),
    then apply the autocast rule (``_runtime.autocast_inputs``). Non-tensors (None biases, inputs
    that validation will reject) pass through unchanged."""
    check_no_forward_ad(op, *tensors)
    return autocast_inputs(*tensors)
