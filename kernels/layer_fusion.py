"""Layer-attention fusion: a per-sample weighted sum of L feature maps, fused forward and backward.

Maths. For L maps f_l: (B, C, H, W) and weights w: (B, L) (in the SR seed, w = softmax over layers
of an MLP of pooled features; this op takes w as given):
    out[b] = Σ_l w[b, l] · f_l[b]
    d f_l[b] = w[b, l] · dout[b],     d w[b, l] = Σ_{c, h, w} dout[b] · f_l[b]
The sum over l runs in one program per tile of the output, accumulating in fp32, so each map is
read once and the output written once. The backward reads dout once and each map once per tile,
writes each map's gradient, and reduces the weight gradient as per-program partials
(B, programs, L), summed in PyTorch in a fixed order (no atomics: bitwise reproducible).

Passes over map-sized tensors (each read or write of a (B, C, H, W) map counts one):
    forward   L reads, 1 write
    backward  L + 1 reads (the maps, dout), L writes (the maps' gradients)
    saved for backward: the L input maps (references, no copy) and w.
Eager torch.stack + weighted sum reads the maps twice (stack copy, then the sum) and writes the
stacked copy besides the output.

Input forms. ``features`` is either one stacked (L, B, C, H, W) tensor (any strides) or a sequence
of L (B, C, H, W) tensors, each with its own strides and storage: no stacking copy is made. For a
sequence the kernels get a table of the maps' data pointers, and a table of their strides when the
maps' strides differ. Gradients come back in the same form (one (L, B, C, H, W) tensor, or one
tensor per map). The output (and each gradient) is channels_last when the (first) map has channels
innermost.

Registration: ``attnsr::layer_fusion(maps: list[Tensor], weights)`` and
``attnsr::layer_fusion_backward``, torch.library custom ops with fake kernels. The maps travel as one
list: [the stacked tensor], or the L maps themselves (still no stacking copy); the map gradients
come back in the same form. Autocast and reverse-mode-only rules as in channel_gate.py.

Limits and precision. L ≥ 1; C, H, W ≥ 1; B ≤ 65535; H·W < 2^31. Accumulation in fp32 (float64 for float64 inputs); the
output is rounded once to the maps' dtype; the weight gradient is returned in w's dtype.
"""

import torch
import triton
import triton.language as tl

from ._gating import (
    PixelRun,
    _tile_offsets,
    acc_dtype,
    check_map_limits,
    empty_map_like,
    empty_stat,
    prepare_inputs,
    refuse_double_backward,
    stat_dtype,
    tile_config,
)
from ._runtime import check_rank, check_runnable, check_same, check_tensor, on_tensor_device


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _map_tile(
    F, PTRS, STRS,  # one map set: base pointer, pointer table, stride table (see the kernels)
    l, b, c, p, W,  # map index, batch index (int64), channel and pixel vectors, map width
    s_l, s_b, s_c, s_h, s_w,  # shared strides (s_l: stacked tensors only)
    TABLE: tl.constexpr, PER_MAP: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Pointers of the [len(c), len(p)] tile of map l, batch element b."""
    if PER_MAP:
        strs = STRS + 4 * l
        s_b = tl.load(strs)
        s_c = tl.load(strs + 1)
        s_h = tl.load(strs + 2)
        s_w = tl.load(strs + 3)
    if TABLE:
        base = tl.load(PTRS + l).to(tl.pointer_type(F.dtype.element_ty))
        if ALIGNED:  # every map starts on 16 bytes (checked on the host): wide loads are allowed
            base = tl.multiple_of(base, 16)
    else:
        base = F + tl.cast(l, tl.int64) * s_l
    return base + b * s_b + _tile_offsets(c, p, W, s_c, s_h, s_w)


@triton.jit
def _layer_fusion_fwd_kernel(
    F,  # the maps: the stacked (L, B, C, H, W) tensor, or (TABLE) the first map (only its dtype is used)
    PTRS,  # (L,) int64: data pointers of the L maps (TABLE)
    STRS,  # (L, 4) int64: strides b, c, h, w of each map (PER_MAP)
    WTS,  # (B, L) weights, any strides
    OUT,  # (B, C, H, W) output, any strides
    sf_l, sf_b, sf_c, sf_h, sf_w,  # strides shared by the maps (elements; sf_l for stacked only)
    sw_b, sw_l,  # weight strides
    so_b, so_c, so_h, so_w,  # output strides
    L, C, HW, W,  # maps, channels, pixels per map, map width
    TABLE: tl.constexpr,  # maps given by a pointer table (a sequence of tensors)
    PER_MAP: tl.constexpr,  # strides differ per map: read them from STRS
    ALIGNED: tl.constexpr,  # every pointer of the table is a multiple of 16 bytes
    ACC: tl.constexpr,  # accumulator dtype: fp32 (fp64 for fp64 inputs)
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (c[:, None] < C) & (p[None, :] < HW)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for l in range(L):
        ptrs = _map_tile(F, PTRS, STRS, l, b, c, p, W, sf_l, sf_b, sf_c, sf_h, sf_w, TABLE, PER_MAP, ALIGNED)
        f = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
        acc += tl.load(WTS + b * sw_b + l * sw_l).to(ACC) * f
    tl.store(OUT + b * so_b + _tile_offsets(c, p, W, so_c, so_h, so_w), acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _layer_fusion_bwd_kernel(
    F, PTRS, STRS,  # the maps, as in the forward kernel
    G, GPTRS, GSTRS,  # their gradients (out), addressed the same way
    WTS,  # (B, L) weights, any strides
    DOUT,  # (B, C, H, W) upstream gradient, any strides (stride 0 included)
    PART,  # (B, NPB, L) contiguous ACC, out: this program's partial Σ dout · f_l
    sf_l, sf_b, sf_c, sf_h, sf_w,  # strides shared by the maps
    sg_l, sg_b, sg_c, sg_h, sg_w,  # strides shared by the gradients
    sw_b, sw_l,  # weight strides
    sd_b, sd_c, sd_h, sd_w,  # dout strides
    L, C, HW, W,  # maps, channels, pixels per map, map width
    NPB,  # programs per batch element
    TABLE: tl.constexpr, PER_MAP: tl.constexpr, G_PER_MAP: tl.constexpr,
    ALIGNED: tl.constexpr, G_ALIGNED: tl.constexpr,  # the maps' / the gradients' pointers are 16-byte multiples
    NEED_DF: tl.constexpr, NEED_DW: tl.constexpr,  # which gradients to compute
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (c[:, None] < C) & (p[None, :] < HW)
    dout = tl.load(DOUT + b * sd_b + _tile_offsets(c, p, W, sd_c, sd_h, sd_w), mask=mask, other=0.0).to(ACC)
    part = PART + (b * NPB + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * L
    for l in range(L):
        if NEED_DW:
            ptrs = _map_tile(F, PTRS, STRS, l, b, c, p, W, sf_l, sf_b, sf_c, sf_h, sf_w, TABLE, PER_MAP, ALIGNED)
            f = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
            tl.store(part + l, tl.sum(tl.sum(dout * f, 1), 0))
        if NEED_DF:
            wt = tl.load(WTS + b * sw_b + l * sw_l).to(ACC)
            gptrs = _map_tile(G, GPTRS, GSTRS, l, b, c, p, W, sg_l, sg_b, sg_c, sg_h, sg_w, TABLE, G_PER_MAP,
                              G_ALIGNED)
            tl.store(gptrs, (wt * dout).to(G.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


class _MapSet:
    """How the kernels address L maps: a stacked (L, B, C, H, W) tensor or a sequence of tensors.

    ``args(run)`` gives (base, pointer table, stride table) and ``shared(run)`` the 5 shared
    strides, with the pixel addressing ``run`` (a ``PixelRun`` over every map of the launch).
    ``aligned``: every pointer of the table is a multiple of 16 bytes, which the kernels tell the
    compiler (a pointer read from a table carries no alignment of its own).
    """

    def __init__(self, maps, stacked: bool):
        self.maps, self.stacked = maps, stacked
        first = maps if stacked else maps[0]
        self.base = first
        self.table = not stacked
        self.per_map = False
        self.aligned = stacked or all(m.data_ptr() % 16 == 0 for m in maps)
        if not stacked:
            self.per_map = any(m.stride() != first.stride() for m in maps)

    def first(self) -> torch.Tensor:
        return self.maps[0]

    def tensors(self) -> list:
        return [self.maps] if self.stacked else list(self.maps)

    def shared(self, run: PixelRun):
        return run.strides(self.maps) if self.stacked else (0, *run.strides(self.maps[0]))

    def args(self, run: PixelRun):
        if self.stacked:
            return self.base, self.base, self.base
        device = self.base.device
        ptrs = torch.tensor([m.data_ptr() for m in self.maps], dtype=torch.int64, device=device)
        strs = torch.tensor([run.strides(m) for m in self.maps], dtype=torch.int64, device=device) \
            if self.per_map else ptrs
        return self.base, ptrs, strs


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
        *maps.args(run), weights, out, *maps.shared(run), *weights.stride(), *run.strides(out),
        weights.shape[1], channels, height * width, run.width,
        TABLE=maps.table, PER_MAP=maps.per_map, ALIGNED=maps.aligned, ACC=acc_dtype(first.dtype),
        BLOCK_C=block_c, BLOCK_P=block_p, **launch,
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
    part = torch.zeros((batch, npb, n_maps), dtype=stat_dtype(first.dtype), device=first.device)
    if first.numel() > 0 and (need_df or need_dw):
        gset = _MapSet(grads, maps.stacked) if need_df else maps
        run = PixelRun(width, *maps.tensors(), *gset.tensors(), dout)
        _layer_fusion_bwd_kernel[grid](
            *maps.args(run), *gset.args(run), weights, dout, part,
            *maps.shared(run), *gset.shared(run), *weights.stride(), *run.strides(dout),
            n_maps, channels, height * width, run.width, npb,
            TABLE=maps.table, PER_MAP=maps.per_map, G_PER_MAP=gset.per_map,
            ALIGNED=maps.aligned, G_ALIGNED=gset.aligned,
            NEED_DF=need_df, NEED_DW=need_dw, ACC=acc_dtype(first.dtype),
            BLOCK_C=block_c, BLOCK_P=block_p, **launch,
        )
    dweights = part.sum(1).to(weights.dtype) if need_dw else None
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
    return grads, empty_stat(weights) if dweights is None else dweights


@_layer_fusion_backward_op.register_fake
def _(dout, maps, weights, need_df, need_dw):
    grads = []
    if need_df:
        grads = [_empty_grads(maps[0], True)] if _is_stacked(maps) else _empty_grads(maps, False)
    return grads, weights.new_empty(weights.shape) if need_dw else empty_stat(weights)


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
refuse_double_backward(_layer_fusion_backward_op, "layer_fusion")


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
    return _layer_fusion_op([features] if stacked else list(features), weights)
