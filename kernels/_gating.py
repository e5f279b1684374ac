"""The gating ops' passes. channel_gate, spatial_gate and cbam_gate are one computation with the
channel gate, the spatial gate or both switched on; this file runs it, in three places:

    statistics  (forward) one launch per gate that is on. Channel gate: the mean (and max with its
                arg-max pixel) of every (b, c) over the pixels, split into chunks of pixels; the
                last program of each batch element merges the chunks and runs the MLP and the
                sigmoid: ca (B, C). Spatial gate: the mean and max (with its arg-max channel) over
                the channels of x · ca (of x without a channel gate) at every pixel: [mean, max]
                (B, 2, H·W), sarg (B, H·W).
    apply       (forward) one launch: y = x · ca[b, c] · s[b, p]. With the spatial gate a program
                owns a 2-D block of pixels and all channels: it computes s of its pixels first (the
                k×k convolution of [mean, max] and the sigmoid) and stores it for backward.
    backward    up to five launches, in order: with the spatial gate, Σ_c dy·x·ca per pixel (the
                spatial dot) and the convolution's backward (a small kernel on (B, 2, H·W) maps);
                with the channel gate, Σ_p g1·x per (b, c) (the channel dot) and the MLP's backward
                (a small kernel, a program per batch element); then dx.

The channel, spatial and CBAM ops (channel_gate.py, spatial_gate.py, cbam.py) are entries into
``gate_forward`` and ``gate_backward`` with their gates switched on; they hold the maths of each
gate, the custom-op registration and the checks of their inputs.

Backward formulas. p = h·W + w is the flat pixel index. g1 is the gradient at the channel-gated map
x·ca (never stored), through the spatial gate s and through the spatial mean (dpool[0], already
divided by C) and max (dpool[1], routed to the arg-max channel sarg):
    g1 = dy · s[b, p] + dpool[b, 0, p] + [c = sarg[b, p]] · dpool[b, 1, p]
    dx = g1 · ca[b, c] + gpool[b, 0, c] + [p = carg[b, c]] · gpool[b, 1, c]
dx adds the channel gate's pooled gradients: through the mean over pixels (gpool[0], already
divided by H·W) and the max over pixels (gpool[1], routed to the arg-max pixel carg). Without a
spatial gate g1 = dy; without a channel gate dx = g1.

How the passes read memory:
  - Reductions keep one accumulator per element of their [channels × pixels] tile and reduce it
    across the tile once, after the loop: no cross-warp reduction (and its barriers) per
    iteration. Each iteration loads two tiles before it uses either.
  - Reductions over pixels are split into enough chunks that the launch runs at least two waves
    of programs on the device (``RESIDENT`` programs per SM): the tail wave is at most a third of
    the launch.
  - The per-pixel side arrays of the backward (s, dpool, sarg: 16 bytes a pixel) are read once per
    block of pixels where a program loops over the channels (dx), and once per tall tile (32
    channels) in the channel dot.
  - The spatial convolution reads [mean, max] (2/C of the map, resident in L2) through a 2-D block
    of pixels: its (TH + k − 1) × (TW + k − 1) neighbourhood is fetched into L1 once and read k²
    times from there, where a run of pixels along one row fetched k rows of its whole length.
  - L2: a pass over a map reads the batch elements in the opposite order to the pass before it
    (``REVERSE``), so that it starts with the ones the previous pass read last, still in L2 (50 MB
    on H100/H200: whole batch elements of SR-sized maps). Maps that a later pass reads again are
    loaded with ``evict_last``, their last reads with ``evict_first``.

Addressing. An element (b, c, h, w) of a map lives at base + b·s_b + c·s_c + h·s_h + w·s_w with the
map's own strides (NCHW, channels_last, views, expanded upstream gradients with stride 0). Offsets
are int64, pixel indices int32 (H·W ≤ MAX_PIXELS: every loop bound stays below 2^31,
tests/test_index_bounds.py). The per-(b, c) and per-(b, pixel) buffers are small, contiguous and
in the accumulator dtype: fp32, or float64 for float64 inputs. No float atomics: the merges of
per-program partials run in the last program to finish (``_last_program``, ``counters``), in a
fixed order; results are bitwise reproducible.

torch.library plumbing shared by the gating ops (each op file registers its own ``attnsr::<op>``
forward and ``attnsr::<op>_backward`` ops) is at the end of this file.
"""

import torch
import triton
import triton.language as tl

from ._runtime import (
    MAX_GRID_YZ,
    MAX_INDEX,
    absent_output,
    acc_dtype,
    autocast_inputs,
    channels_innermost,
    check_no_forward_ad,
    check_runnable,
    device_guard,
    empty_map_like,
    interpreting,
    next_pow2,
    refuse_double_backward,
    refuse_twice,
    register_autocast,
    sm_count,
    stat_dtype,
)

MAX_PIXELS = MAX_INDEX
RESIDENT = 4  # programs of 4 warps an SM holds at once at ≤ 128 registers a thread (64K registers per SM)
CONV_PROGRAMS = 2048  # programs of the convolution's backward in all, at most: bounds its partials

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
    the chunk would be skipped). The loops over it then stay below HW + 2·BLOCK_P < 2^31."""
    return start + tl.minimum(CHUNK, HW - start)


@triton.jit
def _batch(pid, programs, REVERSE: tl.constexpr):
    """Batch element (int64) of grid index pid of ``programs``: the grid's order, or the reverse."""
    if REVERSE:
        pid = programs - 1 - pid
    return pid.to(tl.int64)


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
    """Running (max, arg-max) updated with a later block's (or, elementwise, a later element's):
    the later one wins only when strictly greater, when it holds the first NaN, or when nothing
    was taken yet (run_arg = NONE)."""
    run_nan = run_max != run_max
    take = ~run_nan & ((blk_max != blk_max) | (blk_max > run_max) | (run_arg == NONE))
    return tl.where(take, blk_max, run_max), tl.where(take, blk_arg, run_arg)


@triton.jit
def _lane_max(run_max, run_arg, x, idx, mask, NONE):
    """Elementwise running (max, arg-max) of a tile updated with a later tile x whose elements
    have indices idx (outside ``mask``: ignored). Each element of the running tile then holds the
    max and first arg-max of the elements it saw; ``_block_max`` of it after the loop is the
    tile's (ties go to the lowest index, which was seen first in its lane)."""
    return _merge_max(run_max, run_arg, tl.where(mask, x, float("-inf")), tl.where(mask, idx, NONE), NONE)


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
def _through_spatial_gate(g, c, p, p_in, b, HW, S, DPOOL, SARG):
    """g1 from g = dy on a [channels c × pixels p] tile: g·s + d_mean + [c = arg-max channel]·d_max
    (S, SARG: (B, H·W); DPOOL: (B, 2, H·W); d_mean is already divided by C)."""
    s = tl.load(S + b * HW + p, mask=p_in, other=0.0)
    d_mean = tl.load(DPOOL + (2 * b) * HW + p, mask=p_in, other=0.0)
    d_max = tl.load(DPOOL + (2 * b + 1) * HW + p, mask=p_in, other=0.0)
    s_arg = tl.load(SARG + b * HW + p, mask=p_in, other=-1)
    return g * s[None, :] + d_mean[None, :] + tl.where(c[:, None] == s_arg[None, :], d_max[None, :], 0.0)


ACTS = ("relu", "gelu", "silu")  # the channel MLP's hidden activation: index = the kernels' ACT


@triton.jit
def _act(x, ACT: tl.constexpr):
    """The channel MLP's hidden activation: relu (0; keeps NaN, as torch.relu), gelu (1; erf form,
    nn.GELU's default) or silu (2)."""
    if ACT == 0:
        return tl.where(x < 0, 0.0, x)
    elif ACT == 1:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:
        return x / (1.0 + tl.exp(-x))


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    """d act / dx at x: relu 1 where x > 0 (0 at 0, as torch), gelu Φ(x) + x·φ(x), silu σ(x)·(1 + x·(1 − σ(x)))."""
    if ACT == 0:
        return tl.where(x > 0, 1.0, 0.0)
    elif ACT == 1:
        return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    else:
        sig = 1.0 / (1.0 + tl.exp(-x))
        return sig * (1.0 + x * (1.0 - sig))


@triton.jit
def _mlp_weights_tile(W1, sw1_j, sw1_c, j, j_in, c, c_in, ACC: tl.constexpr):
    """[len(j), len(c)] tile w1[j, c] (hidden units j × channels c), zero outside, in ACC."""
    return tl.load(W1 + j[:, None] * sw1_j + c[None, :] * sw1_c, mask=j_in[:, None] & c_in[None, :],
                   other=0.0).to(ACC)


# ----------------------------------------------------------------------------------------------
# Statistics (forward)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _channel_mlp_forward(
    b, SUM, MAX, ARG, AVG, MX, CARG, CA, W1, B1, W2, B2, sw1_j, sw1_c, sw2_c, sw2_j, sb1, sb2,
    C, HW, NCH, HID,
    WITH_MAX: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, HP: tl.constexpr,
):
    """Epilogue of the channel statistics for batch element b, run by its last program: merge the
    chunks' partials (sums in chunk order; the first chunk attaining the max), store avg, max,
    carg, then the MLP of both branches (hidden activation ACT) and the sigmoid: ca (all (B, C)
    ACC / int32)."""
    j = tl.arange(0, HP)
    j_in = j < HID
    h_avg = tl.zeros([HP], dtype=ACC)
    h_max = tl.zeros([HP], dtype=ACC)
    for c0 in range(0, C, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        c_in = c < C
        rows = (b * C + c) * NCH
        total = tl.zeros([BLOCK_K], dtype=ACC)
        run_max = tl.full([BLOCK_K], float("-inf"), dtype=ACC)
        which = tl.zeros([BLOCK_K], dtype=tl.int32) + NCH  # NCH = none yet
        for n0 in range(0, NCH, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            m = c_in[:, None] & (n < NCH)[None, :]
            offs = rows[:, None] + n[None, :]
            total += tl.sum(tl.load(SUM + offs, mask=m, other=0.0, cache_modifier=".cg"), 1)
            if WITH_MAX:
                part = tl.load(MAX + offs, mask=m, other=float("-inf"), cache_modifier=".cg")
                blk_max, blk_arg = _block_max(part, n[None, :], NCH, 1)
                run_max, which = _merge_max(run_max, which, blk_max, blk_arg, NCH)
        avg = total / HW
        tl.store(AVG + b * C + c, avg, mask=c_in)
        w1 = _mlp_weights_tile(W1, sw1_j, sw1_c, j, j_in, c, c_in, ACC)
        h_avg += tl.sum(w1 * avg[None, :], 1)
        if WITH_MAX:
            arg = tl.load(ARG + rows + which, mask=c_in & (which < NCH), other=0, cache_modifier=".cg")
            tl.store(MX + b * C + c, run_max, mask=c_in)
            tl.store(CARG + b * C + c, arg, mask=c_in)
            h_max += tl.sum(w1 * tl.where(c_in, run_max, 0.0)[None, :], 1)
    if HAS_B1:
        b1 = tl.load(B1 + j * sb1, mask=j_in, other=0.0).to(ACC)
        h_avg += b1
        h_max += b1
    h_avg = _act(h_avg, ACT)
    h_max = _act(h_max, ACT)
    for c0 in range(0, C, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        c_in = c < C
        w2 = tl.load(W2 + c[:, None] * sw2_c + j[None, :] * sw2_j, mask=c_in[:, None] & j_in[None, :],
                     other=0.0).to(ACC)
        z = tl.sum(w2 * h_avg[None, :], 1)
        if WITH_MAX:
            z += tl.sum(w2 * h_max[None, :], 1)
        if HAS_B2:
            b2 = tl.load(B2 + c * sb2, mask=c_in, other=0.0).to(ACC)
            z += b2
            if WITH_MAX:
                z += b2
        tl.store(CA + b * C + c, 1.0 / (1.0 + tl.exp(-z)), mask=c_in)


@triton.jit
def _channel_stats_kernel(
    X,  # input map (B, C, H, W), any strides
    SUM,  # (B, C, NCH) contiguous ACC: partial Σ_p x over each chunk of pixels
    MAX,  # (B, C, NCH) contiguous ACC: partial max over the chunk (WITH_MAX)
    ARG,  # (B, C, NCH) contiguous int32: first pixel attaining that max (WITH_MAX)
    AVG, MX, CARG, CA,  # (B, C) contiguous, out: mean, max (WITH_MAX), arg-max pixel (int32), gate
    W1, B1, W2, B2,  # MLP weights w1 (HID, C), b1 (HID,), w2 (C, HID), b2 (C,): their own dtype and strides
    sw1_j, sw1_c, sw2_c, sw2_j, sb1, sb2,  # their strides (elements)
    COUNT,  # int32 counters, zero: programs of batch element b arrived (``_last_program``)
    sx_b, sx_c, sx_h, sx_w,  # x strides (elements)
    C, HW, W,  # channels, pixels per map, map width as the addressing sees it (PixelRun)
    CHUNK,  # pixels per program (a multiple of 2·BLOCK_P)
    NCH,  # number of chunks = cdiv(HW, CHUNK)
    HID,  # hidden units of the MLP
    WITH_MAX: tl.constexpr,  # also compute max and arg-max (pool="avgmax")
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    ACT: tl.constexpr,  # the MLP's hidden activation (an index of ACTS)
    ACC: tl.constexpr,  # accumulator dtype: fp32 (fp64 for fp64 inputs)
    REVERSE: tl.constexpr, EVICT: tl.constexpr,  # batch order; x's eviction policy
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, HP: tl.constexpr,  # epilogue tiles: channels, chunks, hidden
):
    chunk = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = _batch(tl.program_id(2), tl.num_programs(2), REVERSE)
    c_in = c < C
    X += b * sx_b
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    run_max = tl.full([BLOCK_C, BLOCK_P], float("-inf"), dtype=ACC)
    run_arg = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.int32) + HW  # HW = none yet
    start = chunk * CHUNK
    end = _chunk_end(start, CHUNK, HW)
    for p0 in range(start, end, 2 * BLOCK_P):
        pa = p0 + tl.arange(0, BLOCK_P)
        pb = pa + BLOCK_P
        ma = c_in[:, None] & (pa < end)[None, :]
        mb = c_in[:, None] & (pb < end)[None, :]
        xa = tl.load(X + _tile_offsets(c, pa, W, sx_c, sx_h, sx_w), mask=ma, other=0.0, eviction_policy=EVICT)
        xb = tl.load(X + _tile_offsets(c, pb, W, sx_c, sx_h, sx_w), mask=mb, other=0.0, eviction_policy=EVICT)
        xa = xa.to(ACC)
        xb = xb.to(ACC)
        acc += xa + xb
        if WITH_MAX:
            run_max, run_arg = _lane_max(run_max, run_arg, xa, pa[None, :], ma, HW)
            run_max, run_arg = _lane_max(run_max, run_arg, xb, pb[None, :], mb, HW)
    out = (b * C + c) * NCH + chunk
    tl.store(SUM + out, tl.sum(acc, 1), mask=c_in)
    if WITH_MAX:
        blk_max, blk_arg = _block_max(run_max, run_arg, HW, 1)
        tl.store(MAX + out, blk_max, mask=c_in)
        tl.store(ARG + out, blk_arg, mask=c_in)
    if _last_program(COUNT, b, tl.num_programs(0) * tl.num_programs(1)):
        _channel_mlp_forward(b, SUM, MAX, ARG, AVG, MX, CARG, CA, W1, B1, W2, B2, sw1_j, sw1_c, sw2_c, sw2_j,
                             sb1, sb2, C, HW, NCH, HID, WITH_MAX, HAS_B1, HAS_B2, ACT, ACC, BLOCK_K, BLOCK_N, HP)


@triton.jit
def _spatial_stats_kernel(
    X,  # input map (B, C, H, W), any strides
    CA,  # (B, C) ACC: channel gate applied before the statistics (CHANNEL)
    STATS,  # (B, 2, H·W) contiguous ACC, out: [0] mean over channels, [1] max over channels
    ARG,  # (B, H·W) contiguous int32, out: first channel attaining the max
    sx_b, sx_c, sx_h, sx_w,  # x strides (elements)
    C, HW, W,  # channels, pixels per map, map width as the addressing sees it
    CHANNEL: tl.constexpr,  # statistics of x · ca instead of x
    ACC: tl.constexpr,  # accumulator dtype: fp32 (fp64 for fp64 inputs)
    REVERSE: tl.constexpr, EVICT: tl.constexpr,  # batch order; x's eviction policy
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    b = _batch(tl.program_id(1), tl.num_programs(1), REVERSE)
    p_in = p < HW
    X += b * sx_b
    pix = _pixel_offsets(p, W, sx_h, sx_w)[None, :]
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    run_max = tl.full([BLOCK_C, BLOCK_P], float("-inf"), dtype=ACC)
    run_arg = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.int32) + C  # C = none yet
    for c0 in range(0, C, 2 * BLOCK_C):
        ca_ = c0 + tl.arange(0, BLOCK_C)
        cb_ = ca_ + BLOCK_C
        ma = (ca_ < C)[:, None] & p_in[None, :]
        mb = (cb_ < C)[:, None] & p_in[None, :]
        xa = tl.load(X + ca_.to(tl.int64)[:, None] * sx_c + pix, mask=ma, other=0.0, eviction_policy=EVICT)
        xb = tl.load(X + cb_.to(tl.int64)[:, None] * sx_c + pix, mask=mb, other=0.0, eviction_policy=EVICT)
        xa = xa.to(ACC)
        xb = xb.to(ACC)
        if CHANNEL:
            xa = xa * tl.load(CA + b * C + ca_, mask=ca_ < C, other=0.0)[:, None]
            xb = xb * tl.load(CA + b * C + cb_, mask=cb_ < C, other=0.0)[:, None]
        acc += xa + xb
        run_max, run_arg = _lane_max(run_max, run_arg, xa, ca_[:, None], ma, C)
        run_max, run_arg = _lane_max(run_max, run_arg, xb, cb_[:, None], mb, C)
    blk_max, blk_arg = _block_max(run_max, run_arg, C, 0)
    tl.store(STATS + (2 * b) * HW + p, tl.sum(acc, 0) / C, mask=p_in)
    tl.store(STATS + (2 * b + 1) * HW + p, blk_max, mask=p_in)
    tl.store(ARG + b * HW + p, blk_arg, mask=p_in)


# ----------------------------------------------------------------------------------------------
# Apply (forward)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _conv_gate(STATS, WT, BIAS, b, h, w, p_in, H, W, HW, sw_c, sw_i, sw_j,
               HAS_BIAS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, ACC: tl.constexpr):
    """The spatial gate s = sigmoid(pre) of the pixels (h, w) (int32 vectors, ``p_in`` inside the
    map), pre = Σ_{ch, i, j} weight[0, ch, i, j] · stat_ch[h + i − K//2, w + j − K//2] + bias (zero
    padding). STATS: (B, 2, H·W) contiguous ACC [mean, max]; WT: the (1, 2, K, K) weight with
    strides (sw_c, sw_i, sw_j), in its own dtype; BIAS: (1,). One kernel row i per iteration: a
    [len(h), KP] tile of taps (KP = next power of two ≥ K), their column masks formed once."""
    j = tl.arange(0, KP)
    ww = w[:, None] + (j - K // 2)[None, :]
    cols = p_in[:, None] & (j < K)[None, :] & (ww >= 0) & (ww < W)
    stats = STATS + (2 * b) * HW
    pre = tl.zeros(h.shape, dtype=ACC)
    for i in range(K):
        hh = h + (i - K // 2)
        inside = cols & ((hh >= 0) & (hh < H))[:, None]
        offs = (hh * W)[:, None] + ww
        mean = tl.load(stats + offs, mask=inside, other=0.0, eviction_policy="evict_last")
        mx = tl.load(stats + HW + offs, mask=inside, other=0.0, eviction_policy="evict_last")
        w_mean = tl.load(WT + i * sw_i + j * sw_j, mask=j < K, other=0.0).to(ACC)
        w_max = tl.load(WT + sw_c + i * sw_i + j * sw_j, mask=j < K, other=0.0).to(ACC)
        pre += tl.sum(mean * w_mean[None, :] + mx * w_max[None, :], 1)
    if HAS_BIAS:
        pre += tl.load(BIAS).to(ACC)
    return 1.0 / (1.0 + tl.exp(-pre))


@triton.jit
def _gate_apply_kernel(
    X, Y,  # input and output maps (B, C, H, W), any strides, x dtype
    CA,  # (B, C) contiguous ACC: channel gate (CHANNEL)
    STATS,  # (B, 2, H·W) contiguous ACC: [mean, max] over channels (SPATIAL: the convolution's input)
    WT, BIAS,  # (1, 2, K, K) spatial weight (strides sw_*) and (1,) bias (HAS_BIAS), their own dtype
    S,  # (B, H·W) contiguous ACC, out: the spatial gate s (SPATIAL)
    sx_b, sx_c, sx_h, sx_w,  # x strides (elements)
    sy_b, sy_c, sy_h, sy_w,  # y strides
    sw_c, sw_i, sw_j,  # weight strides along its input map, rows, columns
    C, HW, W,  # channels, pixels per map, map width as the addressing sees it (without SPATIAL)
    MH, MW,  # the map's true height and width (SPATIAL: the pixel blocks and the convolution)
    TILES_W,  # SPATIAL: pixel blocks across the map's width
    CHANNEL: tl.constexpr, SPATIAL: tl.constexpr,  # which gates to apply
    HAS_BIAS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,  # spatial convolution: bias, size, pow2 ≥ K
    ACC: tl.constexpr,  # arithmetic dtype: fp32 (fp64 for fp64 inputs)
    REVERSE: tl.constexpr, EVICT: tl.constexpr,  # batch order; x's eviction policy
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    TW: tl.constexpr,  # SPATIAL: columns of the TH × TW block of pixels (TH = BLOCK_P / TW)
):
    """y = x · ca · s. With SPATIAL a program owns a 2-D block of pixels and all channels (grid axis
    1 has one program): it computes s of its pixels once (the convolution and sigmoid as a
    prologue), stores it for backward, and loops over the channels; without, it owns one
    [channels × pixels] tile of the flat pixels."""
    b = _batch(tl.program_id(2), tl.num_programs(2), REVERSE)
    if SPATIAL:
        tile = tl.program_id(0)
        i = tl.arange(0, BLOCK_P)
        h = (tile // TILES_W) * (BLOCK_P // TW) + i // TW
        w = (tile % TILES_W) * TW + i % TW
        p_in = (h < MH) & (w < MW)
        p = h * MW + w
        s = _conv_gate(STATS, WT, BIAS, b, h, w, p_in, MH, MW, HW, sw_c, sw_i, sw_j, HAS_BIAS, K, KP, ACC)
        tl.store(S + b * HW + p, s, mask=p_in)
        x_pix = h.to(tl.int64) * sx_h + w.to(tl.int64) * sx_w
        y_pix = h.to(tl.int64) * sy_h + w.to(tl.int64) * sy_w
        c_lo = 0
        c_hi = C
    else:
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_in = p < HW
        x_pix = _pixel_offsets(p, W, sx_h, sx_w)
        y_pix = _pixel_offsets(p, W, sy_h, sy_w)
        c_lo = tl.program_id(1) * BLOCK_C
        c_hi = tl.minimum(c_lo + BLOCK_C, C)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c[:, None] < C) & p_in[None, :]
        c64 = c.to(tl.int64)[:, None]
        x = tl.load(X + b * sx_b + c64 * sx_c + x_pix[None, :], mask=mask, other=0.0, eviction_policy=EVICT)
        x = x.to(ACC)
        if CHANNEL:
            ca = tl.load(CA + b * C + c, mask=c < C, other=0.0)
            x = x * ca[:, None]
        if SPATIAL:
            x = x * s[None, :]
        tl.store(Y + b * sy_b + c64 * sy_c + y_pix[None, :], x.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _spatial_dot_kernel(
    DY, X,  # upstream gradient (any strides, stride 0 included) and input map (B, C, H, W)
    CA,  # (B, C) ACC: channel gate (CHANNEL)
    S,  # (B, H·W) ACC: spatial gate
    DPRE,  # (B, H·W) contiguous ACC, out: gradient of the pre-sigmoid map, (Σ_c dy·x·ca) · s · (1 − s)
    sdy_b, sdy_c, sdy_h, sdy_w,  # dy strides (elements)
    sx_b, sx_c, sx_h, sx_w,  # x strides
    C, HW, W,  # channels, pixels per map, map width as the addressing sees it
    CHANNEL: tl.constexpr,  # the spatial gate acts on x · ca
    ACC: tl.constexpr,
    REVERSE: tl.constexpr, EVICT: tl.constexpr,  # batch order; x's eviction policy (dy is read again)
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    b = _batch(tl.program_id(1), tl.num_programs(1), REVERSE)
    p_in = p < HW
    DY += b * sdy_b
    X += b * sx_b
    dy_pix = _pixel_offsets(p, W, sdy_h, sdy_w)[None, :]
    x_pix = _pixel_offsets(p, W, sx_h, sx_w)[None, :]
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for c0 in range(0, C, 2 * BLOCK_C):
        ca_ = c0 + tl.arange(0, BLOCK_C)
        cb_ = ca_ + BLOCK_C
        ma = (ca_ < C)[:, None] & p_in[None, :]
        mb = (cb_ < C)[:, None] & p_in[None, :]
        ga = tl.load(DY + ca_.to(tl.int64)[:, None] * sdy_c + dy_pix, mask=ma, other=0.0, eviction_policy="evict_last")
        gb = tl.load(DY + cb_.to(tl.int64)[:, None] * sdy_c + dy_pix, mask=mb, other=0.0, eviction_policy="evict_last")
        xa = tl.load(X + ca_.to(tl.int64)[:, None] * sx_c + x_pix, mask=ma, other=0.0, eviction_policy=EVICT)
        xb = tl.load(X + cb_.to(tl.int64)[:, None] * sx_c + x_pix, mask=mb, other=0.0, eviction_policy=EVICT)
        prod_a = ga.to(ACC) * xa.to(ACC)
        prod_b = gb.to(ACC) * xb.to(ACC)
        if CHANNEL:
            prod_a = prod_a * tl.load(CA + b * C + ca_, mask=ca_ < C, other=0.0)[:, None]
            prod_b = prod_b * tl.load(CA + b * C + cb_, mask=cb_ < C, other=0.0)[:, None]
        acc += prod_a + prod_b
    s = tl.load(S + b * HW + p, mask=p_in, other=0.0)
    tl.store(DPRE + b * HW + p, tl.sum(acc, 0) * s * (1 - s), mask=p_in)


@triton.jit
def _taps(p, H, W, HW, K: tl.constexpr, KK: tl.constexpr, SIGN: tl.constexpr):
    """[len(p), KK] flat offsets of the pixels (h + SIGN·(i − K//2), w + SIGN·(j − K//2)) of tap
    t = i·K + j around each pixel p = h·W + w, and the mask of those inside the map (zero padding)."""
    t = tl.arange(0, KK)
    dh = SIGN * (t // K - K // 2)
    dw = SIGN * (t % K - K // 2)
    hh = (p // W)[:, None] + dh[None, :]
    ww = (p % W)[:, None] + dw[None, :]
    inside = (p < HW)[:, None] & (t < K * K)[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    return hh * W + ww, inside


@triton.jit
def _conv_block(pid, i, ITERS, n_blocks):
    """Pixel block of iteration i of program pid in the convolution's backward: pid·ITERS + i, or
    n_blocks (one past the last block: every pixel masked) for the iterations past the map. The
    clamp keeps block·BLOCK_P below HW + BLOCK_P < 2^31: unclamped, the last program's trailing
    iterations pass 2^31 for maps near the pixel limit and wrap to negative pixels, which the
    p < HW mask lets through."""
    return tl.minimum(pid * ITERS + i, n_blocks)


@triton.jit
def _spatial_conv_bwd_kernel(
    DPRE,  # (B, H·W) contiguous ACC: gradient of the pre-sigmoid map
    STATS,  # (B, 2, H·W) contiguous ACC: [mean, max] maps saved by the forward
    WT,  # (1, 2, K, K) the convolution weight (strides sw_*), its own dtype
    DPOOL,  # (B, 2, H·W) contiguous ACC, out: [0] d_mean / C (per element of x), [1] d_max
    PW,  # (B, NPB, 2, KK) contiguous ACC, out: this program's partial weight gradient
    PB,  # (B, NPB) contiguous ACC, out: this program's partial bias gradient
    DW, DB,  # out: dweight (1, 2, K, K) contiguous and dbias (1,) (HAS_BIAS), the weight's dtype
    COUNT,  # int32 counters, zero (``_last_program``: the last program sums the partials)
    H, W, HW, C,  # map height, width, pixels; channels (the mean's divisor)
    NPB,  # programs per batch element
    ITERS,  # blocks of BLOCK_P pixels per program: program i takes blocks i·ITERS ... i·ITERS + ITERS − 1
    sw_c, sw_i, sw_j,  # weight strides along its input map, rows, columns
    HAS_BIAS: tl.constexpr, K: tl.constexpr, KK: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,  # partials summed BLOCK_N at a time by the last program
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = tl.arange(0, KK)
    t_in = t < K * K
    w_off = (t // K) * sw_i + (t % K) * sw_j
    w_mean = tl.load(WT + w_off, mask=t_in, other=0.0).to(ACC)
    w_max = tl.load(WT + sw_c + w_off, mask=t_in, other=0.0).to(ACC)
    dpre = DPRE + b * HW
    stats = STATS + (2 * b) * HW
    pw_mean = tl.zeros([KK], dtype=ACC)
    pw_max = tl.zeros([KK], dtype=ACC)
    pb = tl.zeros([BLOCK_P], dtype=ACC)
    n_blocks = tl.cdiv(HW, BLOCK_P)
    for i in range(ITERS):
        p = _conv_block(pid, i, ITERS, n_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_in = p < HW
        # transposed convolution: d_stat[q] = Σ_t w[t] · dpre[q − offset(t)]
        offs, inside = _taps(p, H, W, HW, K, KK, -1)
        dn = tl.load(dpre + offs, mask=inside, other=0.0)
        d_mean = tl.sum(dn * w_mean[None, :], 1) / C
        d_max = tl.sum(dn * w_max[None, :], 1)
        tl.store(DPOOL + (2 * b) * HW + p, d_mean, mask=p_in)
        tl.store(DPOOL + (2 * b + 1) * HW + p, d_max, mask=p_in)
        # weight and bias partials over this block of pixels: Σ_q dpre[q] · stat[q + offset(t)]
        dq = tl.load(dpre + p, mask=p_in, other=0.0)
        offs, inside = _taps(p, H, W, HW, K, KK, 1)
        mean = tl.load(stats + offs, mask=inside, other=0.0)
        mx = tl.load(stats + HW + offs, mask=inside, other=0.0)
        pw_mean += tl.sum(dq[:, None] * mean, 0)
        pw_max += tl.sum(dq[:, None] * mx, 0)
        pb += dq
    part = b * NPB + pid
    tl.store(PW + (2 * part) * KK + t, pw_mean)
    tl.store(PW + (2 * part + 1) * KK + t, pw_max)
    tl.store(PB + part, tl.sum(pb, 0))
    parts = NPB * tl.num_programs(1)
    if _last_program(COUNT, 0, parts):  # the weight and bias gradients: partials summed in order
        dw_mean = tl.zeros([KK], dtype=ACC)
        dw_max = tl.zeros([KK], dtype=ACC)
        db = tl.zeros([BLOCK_N], dtype=ACC)
        for n0 in range(0, parts, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_in = n < parts
            offs = (2 * n)[:, None] * KK + t[None, :]
            dw_mean += tl.sum(tl.load(PW + offs, mask=n_in[:, None], other=0.0, cache_modifier=".cg"), 0)
            dw_max += tl.sum(tl.load(PW + KK + offs, mask=n_in[:, None], other=0.0, cache_modifier=".cg"), 0)
            db += tl.load(PB + n, mask=n_in, other=0.0, cache_modifier=".cg")
        tl.store(DW + t, dw_mean.to(DW.dtype.element_ty), mask=t_in)
        tl.store(DW + K * K + t, dw_max.to(DW.dtype.element_ty), mask=t_in)
        if HAS_BIAS:
            tl.store(DB, tl.sum(db, 0).to(DB.dtype.element_ty))


@triton.jit
def _channel_dot_kernel(
    DY, X,  # upstream gradient (any strides, stride 0 included) and input map (B, C, H, W)
    OUT,  # (B, C, NCH) contiguous ACC: partial Σ_p g1 · x over each chunk of pixels
    S,  # (B, H·W) ACC: spatial gate (SPATIAL)
    DPOOL,  # (B, 2, H·W) ACC: gradient per element through the channel mean (÷ C) and max (SPATIAL)
    SARG,  # (B, H·W) int32: arg-max channel of each pixel (SPATIAL)
    sdy_b, sdy_c, sdy_h, sdy_w,  # dy strides (elements)
    sx_b, sx_c, sx_h, sx_w,  # x strides
    C, HW, W,  # channels, pixels per map, map width as the addressing sees it
    CHUNK, NCH,  # pixels per program (a multiple of 2·BLOCK_P), number of chunks
    SPATIAL: tl.constexpr,  # g1 = dy (channel_gate) or the gradient at x·ca inside cbam_gate
    ACC: tl.constexpr,
    REVERSE: tl.constexpr, EVICT: tl.constexpr,  # batch order; x's eviction policy (its last read: first)
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    chunk = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = _batch(tl.program_id(2), tl.num_programs(2), REVERSE)
    c_in = c < C
    DY += b * sdy_b
    X += b * sx_b
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    start = chunk * CHUNK
    end = _chunk_end(start, CHUNK, HW)
    for p0 in range(start, end, 2 * BLOCK_P):
        pa = p0 + tl.arange(0, BLOCK_P)
        pb = pa + BLOCK_P
        ma = c_in[:, None] & (pa < end)[None, :]
        mb = c_in[:, None] & (pb < end)[None, :]
        ga = tl.load(DY + _tile_offsets(c, pa, W, sdy_c, sdy_h, sdy_w), mask=ma, other=0.0,
                     eviction_policy="evict_last")  # dx reads dy again
        gb = tl.load(DY + _tile_offsets(c, pb, W, sdy_c, sdy_h, sdy_w), mask=mb, other=0.0,
                     eviction_policy="evict_last")
        xa = tl.load(X + _tile_offsets(c, pa, W, sx_c, sx_h, sx_w), mask=ma, other=0.0, eviction_policy=EVICT)
        xb = tl.load(X + _tile_offsets(c, pb, W, sx_c, sx_h, sx_w), mask=mb, other=0.0, eviction_policy=EVICT)
        ga = ga.to(ACC)
        gb = gb.to(ACC)
        if SPATIAL:
            ga = _through_spatial_gate(ga, c, pa, pa < end, b, HW, S, DPOOL, SARG)
            gb = _through_spatial_gate(gb, c, pb, pb < end, b, HW, S, DPOOL, SARG)
        acc += ga * xa.to(ACC) + gb * xb.to(ACC)
    tl.store(OUT + (b * C + c) * NCH + chunk, tl.sum(acc, 1), mask=c_in)


@triton.jit
def _channel_mlp_backward(
    b, DOT, CA, AVG, MX, W1, B1, W2, sw1_j, sw1_c, sw2_c, sw2_j, sb1, GPOOL, DZ, DPRE, HACT,
    C, HW, NCH, HID,
    WITH_MAX: tl.constexpr, HAS_B1: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, HP: tl.constexpr,
):
    """Batch element b of the MLP's backward (``_channel_mlp_backward_kernel``): merge
    dca = Σ_p g1·x from the chunks, dz = dca · ca · (1 − ca), back through both MLP branches
    (pre-activations recomputed from avg and max): gpool (B, 2, C), and for the weight gradients
    dz (B, C), dpre and act(pre) (B, 2, HID) of each branch."""
    j = tl.arange(0, HP)
    j_in = j < HID
    t = tl.zeros([HP], dtype=ACC)  # w2ᵀ · dz
    pre_avg = tl.zeros([HP], dtype=ACC)
    pre_max = tl.zeros([HP], dtype=ACC)
    for c0 in range(0, C, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        c_in = c < C
        dca = tl.zeros([BLOCK_K], dtype=ACC)
        for n0 in range(0, NCH, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            m = c_in[:, None] & (n < NCH)[None, :]
            dca += tl.sum(tl.load(DOT + (b * C + c)[:, None] * NCH + n[None, :], mask=m, other=0.0,
                                  cache_modifier=".cg"), 1)
        ca = tl.load(CA + b * C + c, mask=c_in, other=0.0)
        dz = dca * ca * (1 - ca)
        tl.store(DZ + b * C + c, dz, mask=c_in)
        w2 = tl.load(W2 + c[:, None] * sw2_c + j[None, :] * sw2_j, mask=c_in[:, None] & j_in[None, :],
                     other=0.0).to(ACC)
        t += tl.sum(w2 * dz[:, None], 0)
        w1 = _mlp_weights_tile(W1, sw1_j, sw1_c, j, j_in, c, c_in, ACC)
        pre_avg += tl.sum(w1 * tl.load(AVG + b * C + c, mask=c_in, other=0.0)[None, :], 1)
        if WITH_MAX:
            pre_max += tl.sum(w1 * tl.load(MX + b * C + c, mask=c_in, other=0.0)[None, :], 1)
    if HAS_B1:
        b1 = tl.load(B1 + j * sb1, mask=j_in, other=0.0).to(ACC)
        pre_avg += b1
        pre_max += b1
    d_avg = t * _act_grad(pre_avg, ACT)
    d_max = t * _act_grad(pre_max, ACT)
    tl.store(DPRE + (2 * b) * HID + j, d_avg, mask=j_in)
    tl.store(HACT + (2 * b) * HID + j, _act(pre_avg, ACT), mask=j_in)
    if WITH_MAX:
        tl.store(DPRE + (2 * b + 1) * HID + j, d_max, mask=j_in)
        tl.store(HACT + (2 * b + 1) * HID + j, _act(pre_max, ACT), mask=j_in)
    for c0 in range(0, C, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        c_in = c < C
        w1 = _mlp_weights_tile(W1, sw1_j, sw1_c, j, j_in, c, c_in, ACC)
        tl.store(GPOOL + (2 * b) * C + c, tl.sum(w1 * d_avg[:, None], 0) / HW, mask=c_in)
        if WITH_MAX:
            tl.store(GPOOL + (2 * b + 1) * C + c, tl.sum(w1 * d_max[:, None], 0), mask=c_in)


@triton.jit
def _mlp_weight_grads(
    c0, DZ, DPRE, HACT, AVG, MX, DW1, DB1, DW2, DB2, B, C, HID,
    WITH_MAX: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, HP: tl.constexpr,
):
    """Weight gradients of channels [c0, c0 + BLOCK_K), summed over the batch in order:
    dw2[c, j] = Σ_b dz·(act(pre_avg) + act(pre_max))[j], dw1[j, c] = Σ_b Σ_branch dpre[j]·s[c],
    db2 = Σ_b Σ_branch dz, and with c0 = 0 db1 = Σ_b Σ_branch dpre. The inputs were written by
    other programs of the launch: loaded with cache_modifier=".cg"."""
    c = c0 + tl.arange(0, BLOCK_K)
    c_in = c < C
    j = tl.arange(0, HP)
    j_in = j < HID
    dw2 = tl.zeros([BLOCK_K, HP], dtype=ACC)
    dw1 = tl.zeros([BLOCK_K, HP], dtype=ACC)  # transposed: [c, j]
    db2 = tl.zeros([BLOCK_K], dtype=ACC)
    db1 = tl.zeros([HP], dtype=ACC)
    for b in range(B):
        dz = tl.load(DZ + b * C + c, mask=c_in, other=0.0, cache_modifier=".cg")
        h = tl.load(HACT + (2 * b) * HID + j, mask=j_in, other=0.0, cache_modifier=".cg")
        d = tl.load(DPRE + (2 * b) * HID + j, mask=j_in, other=0.0, cache_modifier=".cg")
        s = tl.load(AVG + b * C + c, mask=c_in, other=0.0)
        dw1 += s[:, None] * d[None, :]
        db1 += d
        if WITH_MAX:
            h += tl.load(HACT + (2 * b + 1) * HID + j, mask=j_in, other=0.0, cache_modifier=".cg")
            d = tl.load(DPRE + (2 * b + 1) * HID + j, mask=j_in, other=0.0, cache_modifier=".cg")
            s = tl.load(MX + b * C + c, mask=c_in, other=0.0)
            dw1 += s[:, None] * d[None, :]
            db1 += d
        dw2 += dz[:, None] * h[None, :]
        db2 += dz
        if WITH_MAX:  # b2 enters both branches
            db2 += dz
    both = c_in[:, None] & j_in[None, :]
    tl.store(DW2 + c[:, None] * HID + j[None, :], dw2.to(DW2.dtype.element_ty), mask=both)
    tl.store(DW1 + j[None, :] * C + c[:, None], dw1.to(DW1.dtype.element_ty), mask=both)
    if HAS_B2:
        tl.store(DB2 + c, db2.to(DB2.dtype.element_ty), mask=c_in)
    if HAS_B1:
        if c0 == 0:
            tl.store(DB1 + j, db1.to(DB1.dtype.element_ty), mask=j_in)


@triton.jit
def _channel_mlp_backward_kernel(
    DOT,  # (B, C, NCH) contiguous ACC: the channel dot's partial Σ_p g1 · x per chunk
    CA, AVG, MX,  # (B, C) ACC: the forward's gate and pooled statistics (MX: WITH_MAX)
    W1, B1, W2,  # MLP weights (their own dtype and strides) and their strides (elements)
    sw1_j, sw1_c, sw2_c, sw2_j, sb1,
    GPOOL,  # (B, 2, C) ACC, out: gradient per element through the pixel mean (÷ H·W) and max
    DZ,  # (B, C) ACC, out: gradient of the pre-sigmoid z
    DPRE, HACT,  # (B, 2, HID) ACC, out: gradient of each branch's pre-activation, and act(pre)
    DW1, DB1, DW2, DB2,  # out (NEED_W), contiguous, the weights' dtypes: (HID, C), (HID,), (C, HID), (C,)
    COUNT,  # int32 counters, zero (``_last_program``: the last program sums the weight gradients)
    C, HW, NCH, HID,  # channels, pixels per map, chunks of the dot pass, hidden units
    NEED_W: tl.constexpr, WITH_MAX: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    ACT: tl.constexpr,  # the MLP's hidden activation (an index of ACTS)
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, HP: tl.constexpr,  # tiles: channels, chunks, hidden
):
    """The sigmoid's and the MLP's backward between the channel dot and dx: program b does batch
    element b (``_channel_mlp_backward``); the last to finish sums the weight gradients over the
    batch (``_mlp_weight_grads``), a few B·C·C/r multiply-adds. (As the dot's epilogue, this code
    made triton 3.6 spill a pointer of the dot loop.)"""
    b = tl.program_id(0).to(tl.int64)
    _channel_mlp_backward(b, DOT, CA, AVG, MX, W1, B1, W2, sw1_j, sw1_c, sw2_c, sw2_j, sb1, GPOOL, DZ, DPRE, HACT,
                          C, HW, NCH, HID, WITH_MAX, HAS_B1, ACT, ACC, BLOCK_K, BLOCK_N, HP)
    if NEED_W:
        if _last_program(COUNT, 0, tl.num_programs(0)):
            for c0 in range(0, C, BLOCK_K):
                _mlp_weight_grads(c0, DZ, DPRE, HACT, AVG, MX, DW1, DB1, DW2, DB2, tl.num_programs(0), C, HID,
                                  WITH_MAX, HAS_B1, HAS_B2, ACC, BLOCK_K, HP)


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
    C, HW, W,  # channels, pixels per map, map width as the addressing sees it
    CHANNEL: tl.constexpr, CMAX: tl.constexpr, SPATIAL: tl.constexpr,  # which terms exist
    ACC: tl.constexpr,
    REVERSE: tl.constexpr,  # batch order (dy's last read: evict_first)
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dx from dy. With SPATIAL a program owns a block of pixels and loops over all channels, so the
    per-pixel side arrays (s, dpool, sarg) are read once per block; without, it owns one tile."""
    b = _batch(tl.program_id(2), tl.num_programs(2), REVERSE)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_in = p < HW
    dy_pix = _pixel_offsets(p, W, sdy_h, sdy_w)[None, :]
    dx_pix = _pixel_offsets(p, W, sdx_h, sdx_w)[None, :]
    if SPATIAL:
        s = tl.load(S + b * HW + p, mask=p_in, other=0.0)[None, :]
        d_mean = tl.load(DPOOL + (2 * b) * HW + p, mask=p_in, other=0.0)[None, :]
        d_max = tl.load(DPOOL + (2 * b + 1) * HW + p, mask=p_in, other=0.0)[None, :]
        s_arg = tl.load(SARG + b * HW + p, mask=p_in, other=-1)[None, :]
        c_lo = 0
        c_hi = C
    else:
        c_lo = tl.program_id(1) * BLOCK_C
        c_hi = tl.minimum(c_lo + BLOCK_C, C)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_in = c < C
        mask = c_in[:, None] & p_in[None, :]
        c64 = c.to(tl.int64)[:, None]
        g = tl.load(DY + b * sdy_b + c64 * sdy_c + dy_pix, mask=mask, other=0.0, eviction_policy="evict_first")
        g = g.to(ACC)
        if SPATIAL:
            g = g * s + d_mean + tl.where(c[:, None] == s_arg, d_max, 0.0)
        if CHANNEL:
            ca = tl.load(CA + b * C + c, mask=c_in, other=0.0)
            g_mean = tl.load(GPOOL + (2 * b) * C + c, mask=c_in, other=0.0)
            g = g * ca[:, None] + g_mean[:, None]
            if CMAX:
                g_max = tl.load(GPOOL + (2 * b + 1) * C + c, mask=c_in, other=0.0)
                c_arg = tl.load(CARG + b * C + c, mask=c_in, other=-1)
                g += tl.where(p[None, :] == c_arg[:, None], g_max[:, None], 0.0)
        tl.store(DX + b * sdx_b + c64 * sdx_c + dx_pix, g.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch rules
# ----------------------------------------------------------------------------------------------


class PixelRun:
    """How the kernels address the flat pixels of the maps of one launch.

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


def _tile_values(t: torch.Tensor) -> int:
    """Values per [channels × pixels] tile of a reduction (16 a thread with 4 warps; each loop
    iteration holds two tiles and the accumulators): 2048, 1024 for float64 (by the compile
    report, fp64 tiles of 2048 spill on sm_90)."""
    return 1024 if t.element_size() > 4 else 2048


def _two_waves(device: torch.device) -> int:
    """Programs in two waves of the device: 2 × RESIDENT programs per SM."""
    return 2 * RESIDENT * sm_count(device)


def tile_config(t: torch.Tensor):
    """(BLOCK_C, BLOCK_P, launch kwargs) of an elementwise pass over map ``t``, a tile per program.

    The tile is long along the map's contiguous dimension (pixels for NCHW, channels for
    channels_last), about 4096 values (1024 for float64: 4096 spilled on sm_90). The interpreter
    runs one numpy op per tile, so its tiles are also large, but small enough that test shapes
    span several tiles."""
    channels, hw = t.shape[1], t.shape[2] * t.shape[3]
    if interpreting():
        return min(next_pow2(channels), 16), 32, {}
    values = 1024 if t.element_size() > 4 else 4096
    if channels_innermost(t):
        block_c = min(next_pow2(channels), 128)
        block_p = min(next_pow2(hw), max(1, values // block_c))
    else:
        block_p = min(next_pow2(hw), 1024)
        block_c = min(next_pow2(channels), max(1, values // block_p))
    return block_c, block_p, dict(num_warps=4)


def pixel_reduction(x: torch.Tensor, side: bool = False):
    """(BLOCK_C, BLOCK_P, CHUNK, NCH, launch kwargs) of a reduction over the pixels of map ``x``
    (the channel statistics and the channel dot): [BLOCK_C × BLOCK_P] tiles, programs of CHUNK
    pixels (a multiple of the two tiles an iteration reads), NCH chunks, with enough chunks that
    B · C-blocks · NCH programs make two waves on the device. ``side``: the tile also reads the
    per-pixel side arrays (cbam_gate's channel dot), so NCHW tiles are 32 channels tall.

    In the interpreter 8-pixel tiles and 4 tiles a chunk: small test maps take the multi-chunk
    path and loop twice per chunk."""
    batch, channels = x.shape[:2]
    hw = x.shape[2] * x.shape[3]
    if interpreting():
        block_c, block_p = min(next_pow2(channels), 16), 8
        chunk = 4 * block_p
        return block_c, block_p, chunk, triton.cdiv(hw, chunk), {}
    values = _tile_values(x)
    if channels_innermost(x):
        block_c = min(next_pow2(channels), 128 if values > 1024 else 64)
        block_p = max(1, values // block_c)
    else:
        block_p = min(next_pow2(hw), 64 if side else 256)
        block_c = min(next_pow2(channels), max(1, values // block_p))
        block_p = min(next_pow2(hw), max(block_p, values // block_c))  # few channels: longer runs
    rows = batch * triton.cdiv(channels, block_c)
    wanted = max(1, triton.cdiv(_two_waves(x.device), max(1, rows)))
    step = 2 * block_p
    chunk = max(step, triton.cdiv(hw, wanted) // step * step)  # rounded down: at least `wanted` chunks
    return block_c, block_p, chunk, triton.cdiv(hw, chunk), dict(num_warps=4)


def channel_loop(x: torch.Tensor):
    """(BLOCK_C, BLOCK_P, launch kwargs) of a pass whose programs own BLOCK_P flat pixels and loop
    over all channels (the spatial statistics, the spatial dot, dx with a spatial gate):
    [BLOCK_C × BLOCK_P] tiles, the pixel block halved (down to 16) while the B · H·W / BLOCK_P
    programs make fewer than two waves."""
    batch, channels = x.shape[:2]
    hw = x.shape[2] * x.shape[3]
    if interpreting():
        return min(next_pow2(channels), 8), 32, {}
    values = _tile_values(x)
    if channels_innermost(x):
        block_c = min(next_pow2(channels), 64)
        block_p = max(16, values // block_c)
    else:
        block_p = 128
        block_c = min(next_pow2(channels), max(1, values // block_p))
    block_p = min(block_p, next_pow2(hw))
    while block_p > 16 and triton.cdiv(hw, block_p) * batch < _two_waves(x.device):
        block_p //= 2
    return block_c, block_p, dict(num_warps=4)


def pixel_blocks(x: torch.Tensor):
    """(BLOCK_C, TH, TW, launch kwargs) of the apply pass with a spatial gate: programs own a
    TH × TW block of pixels (TW along the rows: 32 pixels for NCHW maps, 8 for channels_last) and
    loop over the channels in [BLOCK_C × TH·TW] tiles; TH halved while the blocks make fewer than
    two waves."""
    batch, channels, height, width = x.shape
    if interpreting():
        return min(next_pow2(channels), 8), 4, 8, {}
    values = _tile_values(x)
    if channels_innermost(x):
        tw, pixels = min(8, next_pow2(width)), 64
    else:
        tw, pixels = min(32, next_pow2(width)), 256
    block_c = min(next_pow2(channels), max(1, values // pixels))
    th = min(max(1, pixels // tw), next_pow2(height))
    while th > 1 and triton.cdiv(height, th) * triton.cdiv(width, tw) * batch < _two_waves(x.device):
        th //= 2
    return block_c, th, tw, dict(num_warps=4)


def _conv_config(kernel_size: int):
    """(KK, BLOCK_P, launch kwargs) of the convolution's backward: BLOCK_P × KK ≈ 2048 on a GPU,
    16 values per thread of each [BLOCK_P, KK] tile with 4 warps (8 warps where 16 pixels × KK
    passes 2048, k ≥ 13). At 4096 the 7×7 backward held 255 registers at the benchmark shape
    (4×128×256², sm_90, triton 3.9 and 3.6; it spilled under 3.8): offsets, masks and three
    loaded tiles are live at once; at 2048 it takes 168 (3.9) / 128 (3.6)."""
    kk = next_pow2(kernel_size * kernel_size)
    if interpreting():
        return kk, 64, {}
    block_p = max(16, 2048 // kk)
    return kk, block_p, dict(num_warps=4 if block_p * kk <= 2048 else 8)


def conv_programs(batch: int, hw: int, block_p: int, device: torch.device):
    """(ITERS, NPB) of the convolution's backward: two waves of programs on the device (at most
    CONV_PROGRAMS, at least one per batch element), NPB per batch element, each looping over ITERS
    blocks of pixels. The weight-gradient partials stay under CONV_PROGRAMS × 2 × KK values
    (4 MiB at k = 15) whatever the map size."""
    programs = min(CONV_PROGRAMS, _two_waves(device))
    iters = triton.cdiv(triton.cdiv(hw, block_p), max(1, programs // max(1, batch)))
    return iters, triton.cdiv(hw, block_p * iters)


def _epilogue_tiles(hidden: int, nch: int, dtype: torch.dtype) -> dict:
    """Tiles of the MLP's forward and backward: the hidden units whole (HP), channels in blocks of
    BLOCK_K so that a [HP, BLOCK_K] weight tile holds about 2048 values, chunks in blocks of BLOCK_N
    ≤ 8. The [BLOCK_K, BLOCK_N] tile of chunk partials then holds at most 512 values (4 masked
    loads per thread): at 64 × 16 the backward spilled a predicate register (8 B of stack, sm_90,
    triton 3.9, CBAM's 4×128×256² map in channels_last bf16, 16 chunks). float64 takes 16 channels:
    64 × 8 spilled 8 B under triton 3.6 (CBAM on a 2×32×45² map, 16 chunks), 32 × 4 8 B under 3.9
    (channels_last maps); 16 is clean in both, 48 registers."""
    hp = next_pow2(hidden)
    most = 16 if dtype == torch.float64 else 64
    return dict(BLOCK_K=max(1, min(most, 2048 // hp)), BLOCK_N=min(next_pow2(nch), 8), HP=hp)


def _weights(w1, b1, w2, b2):
    """Pointer and stride arguments of the MLP weights (an absent bias: w1 in its place, stride 0)."""
    return (w1, w1 if b1 is None else b1, w2, w2 if b2 is None else b2, *w1.stride(), *w2.stride(),
            0 if b1 is None else b1.stride(0), 0 if b2 is None else b2.stride(0))


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


def check_map_limits(op: str, x: torch.Tensor, name: str = "x") -> None:
    """Shape limits shared by the gating ops: non-empty maps, grid and index ranges."""
    batch, channels, height, width = x.shape
    if channels < 1 or height < 1 or width < 1:
        raise ValueError(f"{op}: {name} is {tuple(x.shape)}; expected C, H and W of at least 1")
    if batch > MAX_GRID_YZ:
        raise ValueError(f"{op}: {name} has batch {batch}; the kernels handle at most {MAX_GRID_YZ}")
    if height * width > MAX_PIXELS:
        raise ValueError(f"{op}: {name} has H·W = {height * width} pixels; at most {MAX_PIXELS} are supported")


# ----------------------------------------------------------------------------------------------
# The passes
# ----------------------------------------------------------------------------------------------


class GateState:
    """What the forward keeps for backward besides x: the channel gate's ca, avg and (pool="avgmax")
    mx and carg, all (B, C); the spatial gate's [mean, max] (B, 2, H·W), sarg and s (B, H·W).
    None where a gate is off. ``channel_outputs`` / ``spatial_outputs`` are the tensors a custom op
    returns (empty (0,) tensors stand for the max statistics of pool="avg"); ``from_outputs``
    takes them back."""

    __slots__ = ("avg", "ca", "carg", "mx", "s", "sarg", "stats")

    def __init__(self, ca=None, avg=None, mx=None, carg=None, stats=None, sarg=None, s=None):
        self.ca, self.avg, self.mx, self.carg = ca, avg, mx, carg
        self.stats, self.sarg, self.s = stats, sarg, s

    def channel_outputs(self):
        return (self.ca, self.avg, absent_output(self.ca) if self.mx is None else self.mx,
                absent_output(self.ca, torch.int32) if self.carg is None else self.carg)

    def spatial_outputs(self):
        return self.stats, self.sarg, self.s

    @staticmethod
    def from_outputs(pool: str, channel=(None,) * 4, spatial=(None,) * 3) -> "GateState":
        ca, avg, mx, carg = channel
        if pool != "avgmax":
            mx = carg = None
        return GateState(ca, avg, mx, carg, *spatial)


def fake_channel_outputs(x: torch.Tensor, pool: str):
    """Empty tensors shaped as ``GateState.channel_outputs()`` of x: the fake (meta) kernels' answer."""
    sd = stat_dtype(x.dtype)
    bc = tuple(x.shape[:2])
    mx_shape = bc if pool == "avgmax" else (0,)
    return (x.new_empty(bc, dtype=sd), x.new_empty(bc, dtype=sd),
            x.new_empty(mx_shape, dtype=sd), x.new_empty(mx_shape, dtype=torch.int32))


def fake_spatial_outputs(x: torch.Tensor):
    """Fake (meta) ``GateState.spatial_outputs()`` of x: [mean, max] (B, 2, H·W), sarg (B, H·W) int32, s (B, H·W)."""
    batch, hw = x.shape[0], x.shape[2] * x.shape[3]
    sd = stat_dtype(x.dtype)
    return (x.new_empty((batch, 2, hw), dtype=sd), x.new_empty((batch, hw), dtype=torch.int32),
            x.new_empty((batch, hw), dtype=sd))


def weight_grad_outputs(wgrads, w1, b1, w2, b2):
    """(dw1, db1, dw2, db2) as custom-op outputs: an empty (0,) tensor for an absent bias, or for
    all four when the weights need no gradient (``wgrads`` None)."""
    if wgrads is None:
        return tuple(absent_output(w1) for _ in range(4))
    dw1, db1, dw2, db2 = wgrads
    return dw1, absent_output(w1) if db1 is None else db1, dw2, absent_output(w2) if db2 is None else db2


def fake_weight_grads(w1, b1, w2, b2, need_w: bool = True):
    """Fake (meta) weight gradients: contiguous, like the real ones."""
    if not need_w:
        return tuple(absent_output(w1) for _ in range(4))
    return (w1.new_empty(w1.shape), absent_output(w1) if b1 is None else b1.new_empty(b1.shape),
            w2.new_empty(w2.shape), absent_output(w2) if b2 is None else b2.new_empty(b2.shape))


def conv_grad_outputs(conv_grads, weight):
    """(dweight, dbias) as custom-op outputs: an empty (0,) tensor for an absent bias."""
    dweight, dbias = conv_grads
    return dweight, absent_output(weight) if dbias is None else dbias


def fake_conv_grads(weight, bias):
    """Fake (meta) dweight (contiguous, like the real one) and dbias (empty (0,) when bias is None)."""
    return weight.new_empty(weight.shape), absent_output(weight) if bias is None else bias.new_empty((1,))


def _channel_statistics(x, mlp, pool: str, act: str, state: GateState, reverse: bool) -> None:
    """Statistics of the channel gate, one launch: the pooled statistics over pixels, then (the last
    program of each batch element) the MLP and the sigmoid: ca (B, C)."""
    w1, b1, w2, b2 = mlp
    batch, channels, height, width = x.shape
    hw = height * width
    with_max = pool == "avgmax"
    block_c, block_p, chunk, nch, launch = pixel_reduction(x)
    sd = stat_dtype(x.dtype)
    sums = torch.empty((batch, channels, nch), dtype=sd, device=x.device)
    maxes = torch.empty_like(sums) if with_max else sums
    args = torch.empty((batch, channels, nch), dtype=torch.int32, device=x.device) if with_max else sums
    state.ca = ca = torch.empty((batch, channels), dtype=sd, device=x.device)
    state.avg = torch.empty_like(ca)
    state.mx = torch.empty_like(ca) if with_max else None
    state.carg = torch.empty((batch, channels), dtype=torch.int32, device=x.device) if with_max else None
    if batch > 0:
        run = PixelRun(width, x)
        _channel_stats_kernel[(nch, triton.cdiv(channels, block_c), batch)](
            x, sums, maxes, args, state.avg, ca if state.mx is None else state.mx,
            ca if state.carg is None else state.carg, ca, *_weights(w1, b1, w2, b2), counters(x.device),
            *run.strides(x), channels, hw, run.width, chunk, nch, w1.shape[0], WITH_MAX=with_max,
            HAS_B1=b1 is not None, HAS_B2=b2 is not None, ACT=ACTS.index(act), ACC=acc_dtype(x.dtype), REVERSE=reverse,
            EVICT="evict_last", BLOCK_C=block_c, BLOCK_P=block_p, **_epilogue_tiles(w1.shape[0], nch, x.dtype),
            **launch,
        )


def _spatial_statistics(x, state: GateState, reverse: bool) -> None:
    """Statistics of the spatial gate, one launch: [mean, max] over the channels of x · ca (of x
    without a channel gate) (B, 2, H·W) and the first arg-max channel (B, H·W) int32."""
    batch, channels, height, width = x.shape
    hw = height * width
    state.stats = torch.empty((batch, 2, hw), dtype=stat_dtype(x.dtype), device=x.device)
    state.sarg = torch.empty((batch, hw), dtype=torch.int32, device=x.device)
    if batch > 0:
        block_c, block_p, launch = channel_loop(x)
        run = PixelRun(width, x)
        _spatial_stats_kernel[(triton.cdiv(hw, block_p), batch)](
            x, state.stats if state.ca is None else state.ca, state.stats, state.sarg, *run.strides(x), channels, hw,
            run.width, CHANNEL=state.ca is not None, ACC=acc_dtype(x.dtype), REVERSE=reverse, EVICT="evict_last",
            BLOCK_C=block_c, BLOCK_P=block_p, **launch,
        )


def _apply(x, state: GateState, conv, reverse: bool) -> torch.Tensor:
    """y = x · ca[b, c] · s[b, p] in one pass over x; with ``conv`` (weight, bias) s is computed in
    the pass (from state.stats) and stored in state.s."""
    y = empty_map_like(x)
    batch, channels, height, width = x.shape
    hw = height * width
    ca = state.ca
    if conv is None:
        if batch > 0:
            block_c, block_p, launch = tile_config(x)
            run = PixelRun(width, x, y)
            grid = (triton.cdiv(hw, block_p), triton.cdiv(channels, block_c), batch)
            _gate_apply_kernel[grid](
                x, y, ca, ca, ca, ca, ca, *run.strides(x), *run.strides(y), 0, 0, 0, channels, hw, run.width,
                height, width, 1, CHANNEL=True, SPATIAL=False, HAS_BIAS=False, K=1, KP=1,
                ACC=acc_dtype(x.dtype), REVERSE=reverse, EVICT="evict_first", BLOCK_C=block_c, BLOCK_P=block_p,
                TW=1, **launch,
            )
        return y
    weight, bias = conv
    state.s = torch.empty((batch, hw), dtype=state.stats.dtype, device=x.device)
    if batch > 0:
        k = weight.shape[-1]
        block_c, th, tw, launch = pixel_blocks(x)
        tiles_w = triton.cdiv(width, tw)
        _gate_apply_kernel[(triton.cdiv(height, th) * tiles_w, 1, batch)](
            x, y, state.s if ca is None else ca, state.stats, weight, weight if bias is None else bias, state.s,
            *x.stride(), *y.stride(), *weight.stride()[1:], channels, hw, width, height, width, tiles_w,
            CHANNEL=ca is not None, SPATIAL=True, HAS_BIAS=bias is not None, K=k, KP=next_pow2(k),
            ACC=acc_dtype(x.dtype), REVERSE=reverse, EVICT="evict_first", BLOCK_C=block_c, BLOCK_P=th * tw, TW=tw,
            **launch,
        )
    return y


def gate_forward(x: torch.Tensor, mlp=None, conv=None, pool: str = "avg", act: str = "relu"):
    """The forward of a gating op: (y, GateState). ``mlp``: the channel gate's (w1, b1, w2, b2), or
    None, ``act`` its hidden activation (one of ACTS); ``conv``: the spatial gate's (weight, bias),
    or None. Launches: the statistics of each gate that is on, then the apply pass; successive
    passes over x read the batch in opposite orders."""
    state = GateState()
    reverse = True
    if mlp is not None:
        _channel_statistics(x, mlp, pool, act, state, reverse)
        reverse = not reverse
    if conv is not None:
        _spatial_statistics(x, state, reverse)
        reverse = not reverse
    return _apply(x, state, conv, reverse), state


def _spatial_backward(dy, x, conv, state: GateState, reverse: bool, last_x_read: bool):
    """With a spatial gate: the spatial dot (one pass over dy and x: dpre = (Σ_c dy · x · ca) · s ·
    (1 − s), (B, H·W)), then back through the convolution in one small launch: (dpool (B, 2, H·W),
    dweight (1, 2, k, k), dbias (1,) or None)."""
    weight, bias = conv
    batch, channels, height, width = x.shape
    hw = height * width
    sd = state.s.dtype
    dpre = torch.empty((batch, hw), dtype=sd, device=x.device)
    k = weight.shape[-1]
    kk, conv_p, conv_launch = _conv_config(k)
    iters, npb = conv_programs(batch, hw, conv_p, x.device)
    dpool = torch.empty((batch, 2, hw), dtype=sd, device=x.device)
    pw = torch.empty((batch, npb, 2, kk), dtype=sd, device=x.device)
    pb = torch.empty((batch, npb), dtype=sd, device=x.device)
    dweight = weight.new_empty(weight.shape)
    dbias = None if bias is None else bias.new_empty((1,))
    if batch == 0:
        dweight.zero_()
        if dbias is not None:
            dbias.zero_()
        return dpool, dweight, dbias
    block_c, block_p, launch = channel_loop(x)
    run = PixelRun(width, dy, x)
    ca = state.ca
    _spatial_dot_kernel[(triton.cdiv(hw, block_p), batch)](
        dy, x, state.s if ca is None else ca, state.s, dpre, *run.strides(dy), *run.strides(x), channels, hw,
        run.width, CHANNEL=ca is not None, ACC=acc_dtype(x.dtype), REVERSE=reverse,
        EVICT="evict_first" if last_x_read else "evict_last", BLOCK_C=block_c, BLOCK_P=block_p, **launch,
    )
    _spatial_conv_bwd_kernel[(npb, batch)](
        dpre, state.stats, weight, dpool, pw, pb, dweight, dweight if dbias is None else dbias, counters(x.device),
        height, width, hw, channels, npb, iters, *weight.stride()[1:], HAS_BIAS=bias is not None, K=k, KK=kk,
        ACC=acc_dtype(x.dtype), BLOCK_P=conv_p, BLOCK_N=min(64, next_pow2(batch * npb)), **conv_launch,
    )
    return dpool, dweight, dbias


def _channel_backward(dy, x, mlp, act: str, state: GateState, need_w: bool, dpool, reverse: bool):
    """With a channel gate: the channel dot (one pass over dy and x: Σ_p g1 · x per (b, c); g1 = dy,
    or with a spatial gate (``dpool``) the gradient at the channel-gated map), then one small launch
    for the sigmoid's and both MLP branches' backward and, when ``need_w``, the weight gradients.

    Returns gpool (B, 2, C) — [0] gradient per element through the mean (÷ HW), [1] through the
    max (unwritten for pool="avg") — and (dw1, db1, dw2, db2) (None when not ``need_w``; an absent
    bias's gradient None)."""
    w1, b1, w2, b2 = mlp
    batch, channels, height, width = x.shape
    hidden = w1.shape[0]
    sd = state.ca.dtype
    spatial = dpool is not None
    block_c, block_p, chunk, nch, launch = pixel_reduction(x, side=spatial)
    dot = torch.empty((batch, channels, nch), dtype=sd, device=x.device)
    gpool = torch.empty((batch, 2, channels), dtype=sd, device=x.device)
    dz = torch.empty((batch, channels), dtype=sd, device=x.device)
    dpre = torch.empty((batch, 2, hidden), dtype=sd, device=x.device)
    hact = torch.empty_like(dpre)
    wgrads = None
    if need_w:
        wgrads = (w1.new_empty(w1.shape), None if b1 is None else b1.new_empty(b1.shape),
                  w2.new_empty(w2.shape), None if b2 is None else b2.new_empty(b2.shape))
    if batch == 0:
        for g in wgrads or ():
            if g is not None:
                g.zero_()
        return gpool, wgrads
    run = PixelRun(width, dy, x)
    _channel_dot_kernel[(nch, triton.cdiv(channels, block_c), batch)](
        dy, x, dot, state.s if spatial else dot, dpool if spatial else dot, state.sarg if spatial else dot,
        *run.strides(dy), *run.strides(x), channels, height * width, run.width, chunk, nch,
        SPATIAL=spatial, ACC=acc_dtype(x.dtype), REVERSE=reverse, EVICT="evict_first",
        BLOCK_C=block_c, BLOCK_P=block_p, **launch,
    )
    dw1, db1, dw2, db2 = wgrads or (dz,) * 4
    ca = state.ca
    _channel_mlp_backward_kernel[(batch,)](
        dot, ca, state.avg, ca if state.mx is None else state.mx, *_weights(w1, b1, w2, None)[:3],
        *w1.stride(), *w2.stride(), 0 if b1 is None else b1.stride(0), gpool, dz, dpre, hact,
        dw1, dw1 if db1 is None else db1, dw2, dw2 if db2 is None else db2, counters(x.device),
        channels, height * width, nch, hidden, NEED_W=need_w, WITH_MAX=state.mx is not None, HAS_B1=b1 is not None,
        HAS_B2=b2 is not None, ACT=ACTS.index(act), ACC=acc_dtype(x.dtype), **_epilogue_tiles(hidden, nch, x.dtype),
        **({} if interpreting() else dict(num_warps=4)),
    )
    return gpool, wgrads


def _dx(dy, x, state: GateState, gpool, dpool, reverse: bool) -> torch.Tensor:
    """dx from dy in one pass (the formulas in the header); dx takes x's layout."""
    dx = empty_map_like(x)
    batch, channels, height, width = x.shape
    if dx.numel() == 0:
        return dx
    hw = height * width
    spatial = dpool is not None
    if spatial:
        block_c, block_p, launch = channel_loop(x)
        grid = (triton.cdiv(hw, block_p), 1, batch)
    else:
        block_c, block_p, launch = tile_config(x)
        grid = (triton.cdiv(hw, block_p), triton.cdiv(channels, block_c), batch)
    ca = state.ca
    dummy = ca if ca is not None else state.s
    run = PixelRun(width, dy, dx)
    _gate_dx_kernel[grid](
        dy, dx, dummy, dummy if gpool is None else gpool, dummy if state.carg is None else state.carg,
        state.s if spatial else dummy, dpool if spatial else dummy, state.sarg if spatial else dummy,
        *run.strides(dy), *run.strides(dx), channels, hw, run.width,
        CHANNEL=ca is not None, CMAX=state.carg is not None, SPATIAL=spatial, ACC=acc_dtype(x.dtype),
        REVERSE=reverse, BLOCK_C=block_c, BLOCK_P=block_p, **launch,
    )
    return dx


def gate_backward(dy, x, state: GateState, mlp=None, conv=None, need_dx: bool = True, need_w: bool = True,
                  act: str = "relu"):
    """The backward of a gating op: (dx, (dw1, db1, dw2, db2), (dweight, dbias)); dx None unless
    ``need_dx``, the MLP's gradients None unless ``need_w`` (an absent bias's gradient None), the
    convolution's None without a spatial gate. Launches: with the spatial gate the spatial dot and
    the convolution's backward; with the channel gate the channel dot and the MLP's backward; dx.
    Successive passes over the maps read the batch in opposite orders."""
    reverse = True
    dpool = conv_grads = wgrads = gpool = None
    if conv is not None:
        dpool, dweight, dbias = _spatial_backward(dy, x, conv, state, reverse, last_x_read=mlp is None)
        conv_grads = (dweight, dbias)
        reverse = not reverse
    if mlp is not None:
        gpool, wgrads = _channel_backward(dy, x, mlp, act, state, need_w, dpool, reverse)
        reverse = not reverse
    dx = _dx(dy, x, state, gpool, dpool, reverse) if need_dx else None
    return dx, wgrads, conv_grads


# ----------------------------------------------------------------------------------------------
# torch.library plumbing shared by the gating ops
# ----------------------------------------------------------------------------------------------


def prepare_inputs(op: str, *tensors):
    """First step of every public gating function: refuse forward-mode AD (dual tensors, torch.func.jvp),
    then apply the autocast rule (``_runtime.autocast_inputs``). Non-tensors (None biases, inputs
    that validation will reject) pass through unchanged."""
    check_no_forward_ad(op, *tensors)
    return autocast_inputs(*tensors)


class EagerOp:
    """A gating op: its name, its forward and backward bodies and its custom op.

    ``forward(*tensors, *extra)`` returns (y, *saved) as the custom op does; the backward body takes
    (dy, *tensors, *saved, *extra, need_dx[, need_w]) and returns one gradient per input tensor, as
    the backward custom op does. ``n_tensors``: the forward's tensor inputs; ``mlp``: the slice of
    them that are the channel MLP's weights (need_w is whether any of them needs a gradient), or None
    for an op without an MLP (no need_w)."""

    __slots__ = ("backward_body", "custom_op", "forward", "mlp", "n_tensors", "name")

    def __init__(self, name: str, forward, backward_body, custom_op, n_tensors: int, mlp=None):
        self.name, self.forward, self.backward_body, self.custom_op = name, forward, backward_body, custom_op
        self.n_tensors, self.mlp = n_tensors, mlp

    def flags(self, need) -> tuple:
        """(need_dx[, need_w]) from the inputs' ``needs_input_grad``."""
        return (need[0],) if self.mlp is None else (need[0], any(need[self.mlp]))

    def backward(self, dy, saved, extra, need):
        return self.backward_body(dy, *saved, *extra, *self.flags(need))


def register_gate_op(op: EagerOp, backward_op) -> None:
    """Autograd, autocast and the refusal of double backward for the custom op ``op.custom_op``,
    whose forward takes (*tensors, *extra) and returns (y, *saved), and its backward custom op: the
    forward's outputs past y are statistics (not differentiable, no gradients materialised), the
    backward op gets need_dx (and need_w) and its unneeded gradients are dropped."""
    n = op.n_tensors

    def setup_context(ctx, inputs, output):
        saved = output[1:]
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics (or an unused y)
        ctx.save_for_backward(*inputs[:n], *saved)
        ctx.extra = tuple(inputs[n:])

    def backward(ctx, dy, *_stat_grads):
        need = ctx.needs_input_grad[:n]
        if dy is None:
            return (None,) * (n + len(ctx.extra))
        grads = backward_op(dy, *ctx.saved_tensors, *ctx.extra, *op.flags(need))
        return (*(g if k else None for g, k in zip(grads, need)), *(None,) * len(ctx.extra))

    op.custom_op.register_autograd(backward, setup_context=setup_context)
    register_autocast(op.custom_op, op.name)
    refuse_double_backward(backward_op, op.name)


class _GateFunction(torch.autograd.Function):
    """The eager path of the gating ops: the op bodies called directly.

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


_apply_function = super(torch.autograd.Function, _GateFunction).apply  # Function.apply less its Python wrapper


def call_gate(op: EagerOp, tensors: tuple, extra: tuple) -> torch.Tensor:
    """One call of a checked gating op: the custom op under torch.compile and torch.func
    transforms, else the eager Function."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return op.custom_op(*tensors, *extra)[0]
    return _apply_function(op, extra, *tensors)


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
