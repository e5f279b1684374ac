"""Layer-attention fusion: a per-sample weighted sum of L feature maps, fused forward and backward.

Maths. For L maps f_l: (B, C, H, W) and weights w: (B, L) (in the SR seed, w = softmax over layers
of an MLP of pooled features; this op takes w as given):
    out[b] = Σ_l w[b, l] · f_l[b]
    d f_l[b] = w[b, l] · dout[b],     d w[b, l] = Σ_{c, h, w} dout[b] · f_l[b]
The sum over l runs in one program per tile of the output, accumulating in fp32, so each map is
read once and the output written once. The backward reads dout once and each map once per tile,
writes each map's gradient, and reduces the weight gradient as per-program partials
(B, programs, L), which the last program of each batch element to finish sums in a fixed order
(no float atomics: bitwise reproducible; one launch, no PyTorch op).

Passes over map-sized tensors (each read or write of a (B, C, H, W) map counts one):
    forward   L reads, 1 write
    backward  L + 1 reads (the maps, dout), L writes (the maps' gradients)
    saved for backward: the L input maps (references, no copy) and w.
Eager torch.stack + weighted sum reads the maps twice (stack copy, then the sum) and writes the
stacked copy besides the output.

Input forms. ``features`` is either one stacked (L, B, C, H, W) tensor (any strides) or a sequence
of L (B, C, H, W) tensors, each with its own strides and storage: no stacking copy is made. For a
sequence the kernels take the maps as a tuple argument (their data pointers and strides travel in
the launch's parameters, the loop over the maps is unrolled: one compiled kernel per L), so nothing
is copied to the device per call and a launch can be captured in a CUDA graph (torch.compile's
mode="reduce-overhead"). Gradients come back in the same form (one (L, B, C, H, W) tensor, or one
tensor per map). The output (and each gradient) is channels_last when the (first) map has channels
innermost.

Registration: ``attnsr::layer_fusion(maps: list[Tensor], weights)`` and
``attnsr::layer_fusion_backward``, torch.library custom ops with fake kernels. The maps travel as one
list: [the stacked tensor], or the L maps themselves (still no stacking copy); the map gradients
come back in the same form. Autocast and reverse-mode-only rules as in channel_gate.py.

Limits and precision. L ≥ 1; C, H, W ≥ 1; B ≤ 65535; H·W ≤ 2^31 − 2^16. Accumulation in fp32
(float64 for float64 inputs); the output is rounded once to the maps' dtype; the weight gradient is
returned in w's dtype.
"""

import torch
import triton
import triton.language as tl

from ._gating import (
    PixelRun,
    _last_program,
    _tile_offsets,
    check_map_limits,
    counters,
    empty_map_like,
    prepare_inputs,
    tile_config,
)
from ._runtime import (
    absent_output,
    acc_dtype,
    check_rank,
    check_runnable,
    check_same,
    check_tensor,
    next_pow2,
    device_guard,
    on_tensor_device,
    refuse_double_backward,
    refuse_twice,
    register_autocast,
    stat_dtype,
)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _map_tile(F, FS, l, b, c, p, W, STACKED: tl.constexpr):
    """Pointers of the [len(c), len(p)] tile of map l, batch element b. Stacked: F is the (L, B, C,
    H, W) tensor and FS its 5 strides; else F is the tuple of the L maps and FS their 4·L strides
    (b, c, h, w of each), and l is a compile-time index."""
    if STACKED:
        return F + tl.cast(l, tl.int64) * FS[0] + b * FS[1] + _tile_offsets(c, p, W, FS[2], FS[3], FS[4])
    else:
        return F[l] + b * FS[4 * l] + _tile_offsets(c, p, W, FS[4 * l + 1], FS[4 * l + 2], FS[4 * l + 3])


@triton.jit
def _layer_fusion_fwd_kernel(
    F,  # the maps: the stacked (L, B, C, H, W) tensor, or (not STACKED) a tuple of the L maps
    FS,  # their strides (elements): 5 of the stacked tensor (l, b, c, h, w), or 4·L (b, c, h, w per map)
    WTS,  # (B, L) weights, any strides
    OUT,  # (B, C, H, W) output, any strides
    sw_b, sw_l,  # weight strides
    so_b, so_c, so_h, so_w,  # output strides
    L, C, HW, W,  # maps, channels, pixels per map, map width
    STACKED: tl.constexpr,  # one stacked tensor (loop over l at run time) or a tuple (loop unrolled)
    NMAPS: tl.constexpr,  # L, for the unrolled loop over a tuple (1 when STACKED)
    ACC: tl.constexpr,  # accumulator dtype: fp32 (fp64 for fp64 inputs)
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (c[:, None] < C) & (p[None, :] < HW)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    if STACKED:
        for l in range(L):
            f = tl.load(_map_tile(F, FS, l, b, c, p, W, STACKED), mask=mask, other=0.0).to(ACC)
            acc += tl.load(WTS + b * sw_b + l * sw_l).to(ACC) * f
    else:
        for l in tl.static_range(NMAPS):
            f = tl.load(_map_tile(F, FS, l, b, c, p, W, STACKED), mask=mask, other=0.0).to(ACC)
            acc += tl.load(WTS + b * sw_b + l * sw_l).to(ACC) * f
    tl.store(OUT + b * so_b + _tile_offsets(c, p, W, so_c, so_h, so_w), acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _fusion_bwd_map(F, FS, G, GS, l, b, c, p, W, mask, wt, dout, part,
                    STACKED: tl.constexpr, NEED_DF: tl.constexpr, NEED_DW: tl.constexpr, ACC: tl.constexpr):
    """Map l of the backward: its partial Σ dout · f_l into part[l] and its gradient wt · dout."""
    if NEED_DW:
        f = tl.load(_map_tile(F, FS, l, b, c, p, W, STACKED), mask=mask, other=0.0).to(ACC)
        tl.store(part + l, tl.sum(tl.sum(dout * f, 1), 0))
    if NEED_DF:
        ptrs = _map_tile(G, GS, l, b, c, p, W, STACKED)
        tl.store(ptrs, (wt * dout).to(ptrs.dtype.element_ty), mask=mask)


@triton.jit(noinline=True)  # its registers apart from the map loop's (inlined, triton 3.6 spilled 8 B)
def _fusion_dw(PART, DW, b, NPB, L, ACC: tl.constexpr, BLOCK_N: tl.constexpr, LP: tl.constexpr):
    """dw[b, l] = the partials of batch element b summed in program order (the last program of b)."""
    ls = tl.arange(0, LP)
    dw = tl.zeros([LP], dtype=ACC)
    for n0 in range(0, NPB, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        m = (n < NPB)[:, None] & (ls < L)[None, :]
        dw += tl.sum(tl.load(PART + (b * NPB + n)[:, None] * L + ls[None, :], mask=m, other=0.0,
                             cache_modifier=".cg"), 0)
    tl.store(DW + b * L + ls, dw.to(DW.dtype.element_ty), mask=ls < L)


@triton.jit
def _layer_fusion_bwd_kernel(
    F, FS,  # the maps and their strides, as in the forward kernel
    G, GS,  # their gradients (out) and strides, in the same form as the maps
    WTS,  # (B, L) weights, any strides
    DOUT,  # (B, C, H, W) upstream gradient, any strides (stride 0 included)
    PART,  # (B, NPB, L) contiguous ACC, out: this program's partial Σ dout · f_l
    DW,  # (B, L) contiguous, w's dtype, out: the weight gradient (NEED_DW)
    COUNT,  # int32 counters, zero (``_last_program``: the last program of b sums its partials)
    sw_b, sw_l,  # weight strides
    sd_b, sd_c, sd_h, sd_w,  # dout strides
    L, C, HW, W,  # maps, channels, pixels per map, map width
    NPB,  # programs per batch element
    STACKED: tl.constexpr, NMAPS: tl.constexpr,
    NEED_DF: tl.constexpr, NEED_DW: tl.constexpr,  # which gradients to compute
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, LP: tl.constexpr,  # the last program's tile: BLOCK_N partials × LP ≥ L maps
):
    b = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (c[:, None] < C) & (p[None, :] < HW)
    dout = tl.load(DOUT + b * sd_b + _tile_offsets(c, p, W, sd_c, sd_h, sd_w), mask=mask, other=0.0).to(ACC)
    part = PART + (b * NPB + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * L
    if STACKED:
        for l in range(L):
            wt = tl.load(WTS + b * sw_b + l * sw_l).to(ACC)
            _fusion_bwd_map(F, FS, G, GS, l, b, c, p, W, mask, wt, dout, part, STACKED, NEED_DF, NEED_DW, ACC)
    else:
        for l in tl.static_range(NMAPS):
            wt = tl.load(WTS + b * sw_b + l * sw_l).to(ACC)
            _fusion_bwd_map(F, FS, G, GS, l, b, c, p, W, mask, wt, dout, part, STACKED, NEED_DF, NEED_DW, ACC)
    if NEED_DW:
        if _last_program(COUNT, b, NPB):
            _fusion_dw(PART, DW, b, NPB, L, ACC, BLOCK_N, LP)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


class _MapSet:
    """How the kernels address L maps: a stacked (L, B, C, H, W) tensor or a sequence of tensors.

    ``args()`` gives the kernels' (maps, strides) pair: the stacked tensor and its 5 strides, or
    the tuple of the maps and their 4·L strides. Pointers and strides travel as kernel arguments:
    nothing is copied to the device to describe the maps (no host → device copy per call, which
    would stall on pageable memory and is not allowed inside CUDA-graph capture).
    """

    def __init__(self, maps, stacked: bool):
        self.maps, self.stacked = maps, stacked
        self.count = maps.shape[0] if stacked else len(maps)

    def first(self) -> torch.Tensor:
        return self.maps[0]

    def tensors(self) -> list:
        return [self.maps] if self.stacked else list(self.maps)

    def args(self, run: PixelRun):
        """(maps, strides) with the pixel addressing ``run`` (a ``PixelRun`` over every map of the launch)."""
        if self.stacked:
            return self.maps, tuple(run.strides(self.maps))
        return tuple(self.maps), tuple(s for m in self.maps for s in run.strides(m))

    def constexprs(self) -> dict:
        return dict(STACKED=self.stacked, NMAPS=1 if self.stacked else self.count)


def _empty_grads(maps, stacked: bool):
    """Gradients of the maps, in the form they came in, each laid out like its map."""
    if stacked:
        g = empty_map_like(maps[0])  # (B, C, H, W) in the first map's layout
        return torch.empty((maps.shape[0], *g.shape), dtype=maps.dtype, device=maps.device).as_strided(
            maps.shape, (g.numel(), *g.stride())
        )
    return [empty_map_like(m) for m in maps]


def layer_fusion_forward(maps: _MapSet, weights: torch.Tensor) -> torch.Tensor:
    first = maps.first()
    out = empty_map_like(first)
    batch, channels, height, width = first.shape
    if out.numel() == 0:
        return out
    block_c, block_p, launch = tile_config(first)
    grid = (triton.cdiv(height * width, block_p), triton.cdiv(channels, block_c), batch)
    run = PixelRun(width, *maps.tensors(), out)
    _layer_fusion_fwd_kernel[grid](
        *maps.args(run), weights, out, *weights.stride(), *run.strides(out),
        weights.shape[1], channels, height * width, run.width,
        **maps.constexprs(), ACC=acc_dtype(first.dtype), BLOCK_C=block_c, BLOCK_P=block_p, **launch,
    )
    return out


def layer_fusion_backward(dout, maps: _MapSet, weights: torch.Tensor, need_df: bool, need_dw: bool):
    """Returns (grads of the maps in their input form or None, grad of the weights or None)."""
    first = maps.first()
    batch, channels, height, width = first.shape
    n_maps = weights.shape[1]
    grads = _empty_grads(maps.maps, maps.stacked) if need_df else None
    block_c, block_p, launch = tile_config(first)
    grid = (triton.cdiv(height * width, block_p), triton.cdiv(channels, block_c), batch)
    npb = grid[0] * grid[1]
    part = torch.empty((batch, npb, n_maps), dtype=stat_dtype(first.dtype), device=first.device)
    dweights = torch.empty((batch, n_maps), dtype=weights.dtype, device=weights.device) if need_dw else None
    if first.numel() > 0 and (need_df or need_dw):
        gset = _MapSet(grads, maps.stacked) if need_df else maps
        run = PixelRun(width, *maps.tensors(), *gset.tensors(), dout)
        _layer_fusion_bwd_kernel[grid](
            *maps.args(run), *gset.args(run), weights, dout, part, part if dweights is None else dweights,
            counters(first.device), *weights.stride(), *run.strides(dout),
            n_maps, channels, height * width, run.width, npb,
            **maps.constexprs(), NEED_DF=need_df, NEED_DW=need_dw, ACC=acc_dtype(first.dtype),
            BLOCK_C=block_c, BLOCK_P=block_p, BLOCK_N=min(next_pow2(npb), max(1, 1024 // next_pow2(n_maps))),
            LP=next_pow2(n_maps), **launch,
        )
    elif need_dw:
        dweights.zero_()  # maps with no elements (B, C, H or W of 0): nothing to sum
    return grads, dweights


# ----------------------------------------------------------------------------------------------
# Autograd and torch.compile: two torch.library custom ops with fake (meta) kernels
# ----------------------------------------------------------------------------------------------
# The maps travel as one list[Tensor]: [the stacked (L, B, C, H, W) tensor], or the L (B, C, H, W)
# maps themselves (no stacking copy). The map gradients come back in the same form.


def _is_stacked(maps) -> bool:
    return len(maps) == 1 and maps[0].dim() == 5


@torch.library.custom_op("attnsr::layer_fusion", mutates_args=())
@on_tensor_device
def _layer_fusion_op(maps: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = _is_stacked(maps)
    return layer_fusion_forward(_MapSet(maps[0] if stacked else maps, stacked), weights)


@_layer_fusion_op.register_fake
def _(maps, weights):
    return empty_map_like(maps[0][0] if _is_stacked(maps) else maps[0])


@torch.library.custom_op("attnsr::layer_fusion_backward", mutates_args=())
@on_tensor_device
def _layer_fusion_backward_op(
    dout: torch.Tensor, maps: list[torch.Tensor], weights: torch.Tensor, need_df: bool, need_dw: bool
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(map gradients in the maps' form, or [] when not needed; weight gradient, or empty (0,))."""
    stacked = _is_stacked(maps)
    grads, dweights = layer_fusion_backward(
        dout, _MapSet(maps[0] if stacked else maps, stacked), weights, need_df, need_dw
    )
    grads = [] if grads is None else [grads] if stacked else grads
    return grads, absent_output(weights) if dweights is None else dweights


@_layer_fusion_backward_op.register_fake
def _(dout, maps, weights, need_df, need_dw):
    grads = []
    if need_df:
        grads = [_empty_grads(maps[0], True)] if _is_stacked(maps) else _empty_grads(maps, False)
    return grads, weights.new_empty(weights.shape) if need_dw else absent_output(weights)


def _setup_context(ctx, inputs, output):
    maps, weights = inputs
    ctx.save_for_backward(weights, *maps)


def _backward(ctx, dout):
    weights, *maps = ctx.saved_tensors
    need_maps, need_dw = ctx.needs_input_grad
    need_df = any(need_maps)
    grads, dweights = _layer_fusion_backward_op(dout, maps, weights, need_df, need_dw)
    grads = [g if need else None for g, need in zip(grads, need_maps)] if need_df else [None] * len(maps)
    return grads, dweights if need_dw else None


_layer_fusion_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast(_layer_fusion_op, "layer_fusion")
refuse_double_backward(_layer_fusion_backward_op, "layer_fusion")


class _LayerFusionFunction(torch.autograd.Function):
    """The eager path of ``layer_fusion``: the launchers called directly (the custom ops above serve
    torch.compile and torch.func). Inputs: the weights, whether the maps are one stacked tensor,
    then the maps."""

    @staticmethod
    def forward(ctx, weights, stacked, *maps):
        with device_guard(weights):
            out = layer_fusion_forward(_MapSet(maps[0] if stacked else list(maps), stacked), weights)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(weights, *maps)
        ctx.stacked = stacked
        return out

    @staticmethod
    def backward(ctx, dout):
        weights, *maps = ctx.saved_tensors
        if dout is None:
            return (None, None, *[None] * len(maps))
        need_dw = ctx.needs_input_grad[0]
        need_maps = ctx.needs_input_grad[2:]
        need_df = any(need_maps)
        stacked = ctx.stacked
        with device_guard(weights):
            grads, dweights = layer_fusion_backward(dout, _MapSet(maps[0] if stacked else maps, stacked), weights,
                                                    need_df, need_dw)
        grads = ([grads] if stacked else list(grads)) if need_df else [None] * len(maps)
        grads = [g if need else None for g, need in zip(grads, need_maps)]
        dweights, *grads = refuse_twice("layer_fusion", (weights, *maps),
                                        (dweights if need_dw else None, *grads))
        return (dweights, None, *grads)


_apply = super(torch.autograd.Function, _LayerFusionFunction).apply  # Function.apply less its Python wrapper


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def layer_fusion(features, weights):
    """Σ_l weights[b, l] · features[l][b]: the layer-attention fusion of the SR seed.

    features: one (L, B, C, H, W) tensor, or a sequence (list / tuple) of L (B, C, H, W) tensors —
    any strides, no stacking copy; weights: (B, L). All of one dtype and device.
    Returns (B, C, H, W) in the features' dtype, channels_last when the (first) map has channels
    innermost.
    """
    op = "layer_fusion"
    if isinstance(features, torch.Tensor):
        features, weights = prepare_inputs(op, features, weights)
    elif isinstance(features, (list, tuple)):
        *maps, weights = prepare_inputs(op, *features, weights)
        features = tuple(maps) if isinstance(features, tuple) else maps
    if isinstance(features, torch.Tensor):
        stacked = True
        check_tensor(op, "features", features)
        check_rank(op, "features", features, 5, "(L, B, C, H, W), or pass a sequence of L (B, C, H, W) maps")
        n_maps, map_shape = features.shape[0], tuple(features.shape[1:])
        tensors = {"features": features}
    elif isinstance(features, (list, tuple)):
        stacked = False
        n_maps = len(features)
        if n_maps == 0:
            raise ValueError(f"{op}: features is an empty {type(features).__name__}; expected L ≥ 1 maps")
        tensors = {}
        for i, f in enumerate(features):
            check_tensor(op, f"features[{i}]", f)
            check_rank(op, f"features[{i}]", f, 4, "(B, C, H, W)")
            if f.shape != features[0].shape:
                raise ValueError(
                    f"{op}: features[0] is {tuple(features[0].shape)} but features[{i}] is {tuple(f.shape)}; "
                    "all maps must share (B, C, H, W)"
                )
            tensors[f"features[{i}]"] = f
        map_shape = tuple(features[0].shape)
    else:
        raise TypeError(
            f"{op}: features must be a (L, B, C, H, W) tensor or a list/tuple of (B, C, H, W) tensors, "
            f"got {type(features).__name__}"
        )
    if n_maps < 1:
        raise ValueError(f"{op}: features has L = 0 maps; expected L ≥ 1")
    check_tensor(op, "weights", weights)
    check_rank(op, "weights", weights, 2, "(B, L)")
    batch = map_shape[0]
    if tuple(weights.shape) != (batch, n_maps):
        raise ValueError(
            f"{op}: weights is {tuple(weights.shape)} but features has L = {n_maps} maps of batch B = {batch}; "
            f"expected weights (B, L) = ({batch}, {n_maps})"
        )
    tensors["weights"] = weights
    check_same(op, tensors)
    check_map_limits(op, features[0], "each map (B, C, H, W)")
    check_runnable(op, weights.device)
    maps = [features] if stacked else list(features)
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return _layer_fusion_op(maps, weights)
    return _apply(weights, stacked, *maps)
