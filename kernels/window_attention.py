"""Shifted-window attention (Swin's W-MSA / SW-MSA, as in SwinIR, HAT, DRCT, ...), fused, forward and backward.

Maths. The (H, W) token map is rolled by (−sh, −sw) and cut into Wh×Ww windows of N = Wh·Ww tokens.
In each window and head, with Q, K, V: (N, D),
    S = Q Kᵀ · scale + B + M,   P = softmax_rows(S),   O = P V,
where B[i, j] = table[(yᵢ − yⱼ + Wh − 1)·(2Ww − 1) + (xᵢ − xⱼ + Ww − 1), head] is the relative
position bias (y, x: a token's row and column inside its window) and M the shifted-window mask:
Swin's −100 between tokens that came from different regions of the unrolled map (computed here
from token coordinates), or an explicit additive (M, N, N) mask given by the caller, whose slices
the batch's windows cycle through (SwinIR's broadcast of an (nW, N, N) mask). The output is rolled
back, so O is written where the query token was read.
No roll, partition or reverse is ever materialised: the token of window w at position t is read at
    row = (wr·Wh + t // Ww + sh) mod H,   col = (wc·Ww + t % Ww + sw) mod W
of the input maps, whatever their strides (a (B, H, W, 3C) qkv projection split in three, NHWC,
or NCHW maps seen through a permuted view).

Forward: online softmax over key blocks with fp32 running max and sum (the attention kernels'
scheme); saves LSE per query token. Backward: Δ = rowsum(dO ∘ O); dK, dV per key block and dQ per
query block of each window, recomputing P from LSE; the bias-table gradient
dtable[r, h] = Σ over batch, windows and pairs (i, j) with offset r of dS[i, j] is formed without
atomics: a kernel sums dS over a fixed, strided set of (batch, window) per program into fp32
partial (N, N) tiles per head; a second small kernel sums, in a fixed order, over the partials and
over the pairs of each offset (a padded gather). Two runs give bitwise-equal gradients.

Limits. Window sides ≥ 1 and dividing the map; 0 ≤ shift < window side; head dim D = C/heads ≤ 256
(the query block and accumulators live in registers); windows of at most 2^31 tokens in all. The
mask gets no gradient. fp32 inputs use tf32 when PyTorch allows it for CUDA matmuls, else exact
fp32; fp16/bf16 accumulate in fp32; float64 computes in float64. Reverse mode only.
"""

import contextlib
import functools
import math
import numbers
import warnings

import torch
import triton
import triton.language as tl

from . import _tuned
from ._runtime import (
    MAX_GRID_YZ,
    MAX_INDEX,
    absent_output,
    acc_dtype,
    autocast_inputs,
    check_no_forward_ad,
    check_rank,
    check_runnable,
    check_same,
    check_scale,
    check_tensor,
    dot_dtype,
    dot_precision,
    interpreting,
    next_pow2,
    on_tensor_device,
    positive_int,
    refuse_double_backward,
    register_autocast,
    stat_dtype,
    LaunchPlans,
    ValidCalls,
    check_launch_settings,
    overriding,
    poison,
    device_guard,
    grad_layout,
    grad_views,
    packed_base,
    refuse_twice,
)

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
SWIN_MASK_VALUE = -100.0  # what Swin's reference code puts between tokens of different regions
MASK_NONE, MASK_SWIN, MASK_GIVEN = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _window_tokens(wid, t, NWC, WH: tl.constexpr, WW: tl.constexpr, SH, SW, H, W, SHIFTED: tl.constexpr):
    """Token t of window wid: (row, col inside the window; row, col in the rolled frame; row, col
    in the input map). Windows are numbered row-major, NWC per row of windows."""
    ti = t // WW
    tj = t % WW
    r = (wid // NWC) * WH + ti
    c = (wid % NWC) * WW + tj
    if SHIFTED:
        return ti, tj, r, c, (r + SH) % H, (c + SW) % W
    return ti, tj, r, c, r, c


@triton.jit
def _tile_ptrs(ptr, ro, co, d, s_y, s_x, s_c):
    """Pointers of the (len(ro), len(d)) tile of token vectors at map rows ro, columns co."""
    return ptr + (ro.to(tl.int64) * s_y + co.to(tl.int64) * s_x)[:, None] + (d.to(tl.int64) * s_c)[None, :]


@triton.jit
def _dot_chunk(acc, X, ro_x, co_x, rows_x, sx_y, sx_x, sx_c, Y, ro_y, co_y, rows_y, sy_y, sy_x, sy_c, offs_c, D,
               DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """acc + X·Yᵀ over the head-dim features ``offs_c`` (the chunked launches: see BLOCK_DC in
    kernels/attention.py); ``rows_x`` / ``rows_y``: which token rows of the tiles exist."""
    x = tl.load(_tile_ptrs(X, ro_x, co_x, offs_c, sx_y, sx_x, sx_c), mask=rows_x[:, None] & (offs_c[None, :] < D),
                other=0.0).to(DOT)
    y = tl.load(_tile_ptrs(Y, ro_y, co_y, offs_c, sy_y, sy_x, sy_c), mask=rows_y[:, None] & (offs_c[None, :] < D),
                other=0.0).to(DOT)
    return tl.dot(x, tl.trans(y), acc, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _region(r, H, WH: tl.constexpr, SH):
    """Swin's region of a rolled-frame row (or column): 0 before the last window, 1 in the last
    window before the rolled-in strip, 2 in the rolled-in strip of SH rows."""
    return (r >= H - WH).to(tl.int32) + (r >= H - SH).to(tl.int32)


@triton.jit
def _mask_window(b, wid, H, NWC, NMW, WH: tl.constexpr, MASK_MODE: tl.constexpr):
    """Which (N, N) slice of a given mask window wid of batch element b takes: the windows of the
    batch, numbered b·nW + wid, cycle through the mask's NMW slices (SwinIR's broadcast of an
    (nW, N, N) mask over nW·B partitioned windows)."""
    if MASK_MODE == 2:
        mwid = (b * ((H // WH) * NWC) + wid) % NMW
    else:
        mwid = wid.to(tl.int64)
    return mwid


@triton.jit
def _window_program(NB, BLOCK: tl.constexpr, H, NWC, NMW, WH: tl.constexpr, MASK_MODE: tl.constexpr):
    """(window, head, batch element, token offsets of the program's block, the mask's window) of a
    program of a (windows · NB blocks per window, heads, batch) grid."""
    wid = tl.program_id(0) // NB
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs = (tl.program_id(0) % NB) * BLOCK + tl.arange(0, BLOCK)
    return wid, h, b, offs, _mask_window(b, wid, H, NWC, NMW, WH, MASK_MODE)


@triton.jit
def _bias_mask(
    TABLE, st_r, st_h, h, MASK, sm_w, sm_i, sm_j, mwid,  # mwid: the mask's (N, N) slice of this window
    tq, yq, xq, rq, cq,  # query tokens: index, row and column in the window, row and column in the rolled frame
    tk, yk, xk, rk, ck,  # key tokens, the same; q and k arguments are broadcastable (either orientation)
    valid, H, W, SH, SW,
    WH: tl.constexpr, WW: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_MODE: tl.constexpr, ACC: tl.constexpr,
):
    """B + M of the score tile, in natural units (the caller scales it by log2 e)."""
    extra = tl.zeros(valid.shape, dtype=ACC)
    if HAS_BIAS:
        idx = (yq - yk + (WH - 1)) * (2 * WW - 1) + (xq - xk + (WW - 1))
        extra += tl.load(TABLE + idx.to(tl.int64) * st_r + h * st_h, mask=valid, other=0.0).to(ACC)
    if MASK_MODE == 1:
        same = (_region(rq, H, WH, SH) == _region(rk, H, WH, SH)) & (_region(cq, W, WW, SW) == _region(ck, W, WW, SW))
        extra += tl.where(same, 0.0, -100.0).to(ACC)
    if MASK_MODE == 2:
        extra += tl.load(MASK + mwid.to(tl.int64) * sm_w + tq.to(tl.int64) * sm_i + tk.to(tl.int64) * sm_j,
                         mask=valid, other=0.0).to(ACC)
    return extra


@triton.jit
def _win_fwd_kernel(
    Q, K, V, O,  # (B, H, W, C) token maps, any strides; head h owns channels [h·D, (h+1)·D)
    LSE,  # (B, NH, H·W) contiguous, ACC: log2-sum-exp2 of each query token's scaled logits
    TABLE,  # ((2WH−1)(2WW−1), NH) relative position bias table (HAS_BIAS), any strides
    MASK,  # (nW, N, N) additive mask (MASK_MODE 2), any strides
    sq_b, sq_y, sq_x, sq_c,  # Q strides (elements): batch, row, column, channel
    sk_b, sk_y, sk_x, sk_c,  # K strides
    sv_b, sv_y, sv_x, sv_c,  # V strides
    so_b, so_y, so_x, so_c,  # O strides
    st_r, st_h,  # TABLE strides: offset, head
    sm_w, sm_i, sm_j, NMW,  # MASK strides (window, query, key), mask windows
    H, W, D, NH,  # map height, width (tokens), head dim (unpadded), heads
    NWC, NQB,  # windows per row of windows, query blocks per window
    SH, SW,  # cyclic shift (rows, columns)
    scale: tl.float64, qk_scale: tl.float64, log2e: tl.float64,  # scale, scale · log2 e, log2 e (B + M × log2 e)
    WH: tl.constexpr, WW: tl.constexpr,  # window height, width
    SHIFTED: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_MODE: tl.constexpr,  # 0 none, 1 Swin's, 2 given
    ACC: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    N: tl.constexpr = WH * WW
    if ACC != tl.float64:  # fp32 kernels convert the fp64 scalars once; float64 ones keep every bit
        scale, qk_scale, log2e = tl.cast(scale, ACC), tl.cast(qk_scale, ACC), tl.cast(log2e, ACC)
    wid, h, b, offs_m, mwid = _window_program(NQB, BLOCK_M, H, NWC, NMW, WH, MASK_MODE)
    offs_d = tl.arange(0, BLOCK_D)
    yq, xq, rq, cq, roq, coq = _window_tokens(wid, offs_m, NWC, WH, WW, SH, SW, H, W, SHIFTED)
    mask_q = (offs_m[:, None] < N) & (offs_d[None, :] < D)
    q = tl.load(_tile_ptrs(Q + b * sq_b + h * D * sq_c, roq, coq, offs_d, sq_y, sq_x, sq_c), mask=mask_q,
                other=0.0).to(DOT)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        yk, xk, rk, ck, rok, cok = _window_tokens(wid, offs_n, NWC, WH, WW, SH, SW, H, W, SHIFTED)
        mask_k = (offs_n[:, None] < N) & (offs_d[None, :] < D)
        k = tl.load(_tile_ptrs(K + b * sk_b + h * D * sk_c, rok, cok, offs_d, sk_y, sk_x, sk_c), mask=mask_k,
                    other=0.0).to(DOT)
        valid = (offs_m[:, None] < N) & (offs_n[None, :] < N)
        extra = _bias_mask(TABLE, st_r, st_h, h, MASK, sm_w, sm_i, sm_j, mwid,
                           offs_m[:, None], yq[:, None], xq[:, None], rq[:, None], cq[:, None],
                           offs_n[None, :], yk[None, :], xk[None, :], rk[None, :], ck[None, :],
                           valid, H, W, SH, SW, WH, WW, HAS_BIAS, MASK_MODE, ACC)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * qk_scale + extra * log2e
        s = tl.where(offs_n[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row whose keys so far are all masked out (−inf: a caller's mask) keeps m = −inf; subtract 0
        # there, not −inf (−inf − −inf is NaN): its p and the rescale of its empty sums are then 0
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(_tile_ptrs(V + b * sv_b + h * D * sv_c, rok, cok, offs_d, sv_y, sv_x, sv_c), mask=mask_k,
                    other=0.0).to(DOT)
        p = p.to(V.dtype.element_ty).to(DOT)  # rounded to the storage dtype, as on a GPU
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION, out_dtype=ACC)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(_tile_ptrs(O + b * so_b + h * D * so_c, roq, coq, offs_d, so_y, so_x, so_c),
             acc.to(O.dtype.element_ty), mask=mask_q)
    pos = roq.to(tl.int64) * W + coq
    tl.store(LSE + (b * NH + h) * H * W + pos, m_i + tl.log2(l_i), mask=offs_m < N)


@triton.jit
def _win_delta_kernel(
    O, DO,  # (B, H, W, C) forward output and its upstream gradient, any strides (stride 0 too)
    DELTA,  # (B, NH, H·W) contiguous, ACC: rowsum(dO ∘ O) per token and head
    so_b, so_y, so_x, so_c, sdo_b, sdo_y, sdo_x, sdo_c,
    H, W, D, NH,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pos = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # token index y·W + x
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    y = pos // W
    x = pos % W
    mask = (pos[:, None] < H * W) & (offs_d[None, :] < D)
    o = tl.load(_tile_ptrs(O + b * so_b + h * D * so_c, y, x, offs_d, so_y, so_x, so_c), mask=mask, other=0.0)
    do = tl.load(_tile_ptrs(DO + b * sdo_b + h * D * sdo_c, y, x, offs_d, sdo_y, sdo_x, sdo_c), mask=mask, other=0.0)
    delta = tl.sum(o.to(ACC) * do.to(ACC), 1)
    tl.store(DELTA + (b * NH + h) * H * W + pos, delta, mask=pos < H * W)


@triton.jit
def _win_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV,  # (B, H, W, C) token maps, any strides
    LSE, DELTA,  # (B, NH, H·W) contiguous statistics
    TABLE, MASK,
    sq_b, sq_y, sq_x, sq_c, sk_b, sk_y, sk_x, sk_c, sv_b, sv_y, sv_x, sv_c, sdo_b, sdo_y, sdo_x, sdo_c,
    sdk_b, sdk_y, sdk_x, sdk_c, sdv_b, sdv_y, sdv_x, sdv_c,
    st_r, st_h, sm_w, sm_i, sm_j, NMW,
    H, W, D, NH, NWC, NKB,  # NKB: key blocks per window
    SH, SW, scale: tl.float64, qk_scale: tl.float64, log2e: tl.float64,  # shift; scalars as in the forward
    WH: tl.constexpr, WW: tl.constexpr, SHIFTED: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_MODE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DC: tl.constexpr = 0,  # 0: hold K and V; else Sᵀ and dPᵀ over head-dim chunks this wide
):
    N: tl.constexpr = WH * WW
    if ACC != tl.float64:  # fp32 kernels convert the fp64 scalars once; float64 ones keep every bit
        scale, qk_scale, log2e = tl.cast(scale, ACC), tl.cast(qk_scale, ACC), tl.cast(log2e, ACC)
    wid, h, b, offs_n, mwid = _window_program(NKB, BLOCK_N, H, NWC, NMW, WH, MASK_MODE)
    offs_d = tl.arange(0, BLOCK_D)
    stats = LSE + (b * NH + h) * H * W
    dstats = DELTA + (b * NH + h) * H * W
    yk, xk, rk, ck, rok, cok = _window_tokens(wid, offs_n, NWC, WH, WW, SH, SW, H, W, SHIFTED)
    mask_k = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    K += b * sk_b + h * D * sk_c
    V += b * sv_b + h * D * sv_c
    Q += b * sq_b + h * D * sq_c
    DO += b * sdo_b + h * D * sdo_c
    if BLOCK_DC == 0:
        k = tl.load(_tile_ptrs(K, rok, cok, offs_d, sk_y, sk_x, sk_c), mask=mask_k, other=0.0).to(DOT)
        v = tl.load(_tile_ptrs(V, rok, cok, offs_d, sv_y, sv_x, sv_c), mask=mask_k, other=0.0).to(DOT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        yq, xq, rq, cq, roq, coq = _window_tokens(wid, offs_m, NWC, WH, WW, SH, SW, H, W, SHIFTED)
        mask_q = (offs_m[:, None] < N) & (offs_d[None, :] < D)
        if BLOCK_DC == 0:
            q = tl.load(_tile_ptrs(Q, roq, coq, offs_d, sq_y, sq_x, sq_c), mask=mask_q, other=0.0).to(DOT)
            do = tl.load(_tile_ptrs(DO, roq, coq, offs_d, sdo_y, sdo_x, sdo_c), mask=mask_q, other=0.0).to(DOT)
        else:
            s_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
            dp_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
            for dc in range(0, BLOCK_D, BLOCK_DC):
                offs_c = dc + tl.arange(0, BLOCK_DC)
                s_t = _dot_chunk(s_t, K, rok, cok, offs_n < N, sk_y, sk_x, sk_c, Q, roq, coq, offs_m < N, sq_y, sq_x,
                                 sq_c, offs_c, D, DOT, PRECISION, ACC)
                dp_t = _dot_chunk(dp_t, V, rok, cok, offs_n < N, sv_y, sv_x, sv_c, DO, roq, coq, offs_m < N, sdo_y,
                                  sdo_x, sdo_c, offs_c, D, DOT, PRECISION, ACC)
            q = tl.load(_tile_ptrs(Q, roq, coq, offs_d, sq_y, sq_x, sq_c), mask=mask_q, other=0.0).to(DOT)
            do = tl.load(_tile_ptrs(DO, roq, coq, offs_d, sdo_y, sdo_x, sdo_c), mask=mask_q, other=0.0).to(DOT)
        pos = roq.to(tl.int64) * W + coq
        # query rows past N get LSE = +inf, hence P = 0: they add nothing
        lse = tl.load(stats + pos, mask=offs_m < N, other=float("inf"))
        delta = tl.load(dstats + pos, mask=offs_m < N, other=0.0)
        valid = (offs_n[:, None] < N) & (offs_m[None, :] < N)
        extra = _bias_mask(TABLE, st_r, st_h, h, MASK, sm_w, sm_i, sm_j, mwid,
                           offs_m[None, :], yq[None, :], xq[None, :], rq[None, :], cq[None, :],
                           offs_n[:, None], yk[:, None], xk[:, None], rk[:, None], ck[:, None],
                           valid, H, W, SH, SW, WH, WW, HAS_BIAS, MASK_MODE, ACC)
        if BLOCK_DC == 0:
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION, out_dtype=ACC)
        s_t = s_t * qk_scale + extra * log2e
        p_t = tl.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(DO.dtype.element_ty).to(DOT), do, input_precision=PRECISION, out_dtype=ACC)
        if BLOCK_DC == 0:
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION, out_dtype=ACC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(Q.dtype.element_ty).to(DOT), q, input_precision=PRECISION, out_dtype=ACC)
    dk = dk * scale
    tl.store(_tile_ptrs(DK + b * sdk_b + h * D * sdk_c, rok, cok, offs_d, sdk_y, sdk_x, sdk_c),
             dk.to(DK.dtype.element_ty), mask=mask_k)
    tl.store(_tile_ptrs(DV + b * sdv_b + h * D * sdv_c, rok, cok, offs_d, sdv_y, sdv_x, sdv_c),
             dv.to(DV.dtype.element_ty), mask=mask_k)


@triton.jit
def _win_scores_grad(
    Q, K, V, DO, LSE, DELTA, TABLE, MASK,
    sq_y, sq_x, sq_c, sk_y, sk_x, sk_c, sv_y, sv_x, sv_c, sdo_y, sdo_x, sdo_c,
    st_r, st_h, sm_w, sm_i, sm_j,
    wid, mwid, h, offs_m, offs_n, offs_d, H, W, D, NWC, SH, SW, qk_scale, log2e,  # mwid: the mask's window
    WH: tl.constexpr, WW: tl.constexpr, SHIFTED: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_MODE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr, BLOCK_DC: tl.constexpr,
):
    """dS = P ∘ (dO Vᵀ − Δ) of a (query block, key block) tile of one window and head, with the key
    tile K (to form dQ = dS K). Q, K, V, DO, LSE, DELTA point at this batch element (and head).
    BLOCK_DC > 0: S and dP over head-dim chunks of that width (see the dK/dV kernel)."""
    N: tl.constexpr = WH * WW
    yq, xq, rq, cq, roq, coq = _window_tokens(wid, offs_m, NWC, WH, WW, SH, SW, H, W, SHIFTED)
    yk, xk, rk, ck, rok, cok = _window_tokens(wid, offs_n, NWC, WH, WW, SH, SW, H, W, SHIFTED)
    mask_q = (offs_m[:, None] < N) & (offs_d[None, :] < D)
    mask_k = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    if BLOCK_DC == 0:
        q = tl.load(_tile_ptrs(Q, roq, coq, offs_d, sq_y, sq_x, sq_c), mask=mask_q, other=0.0).to(DOT)
        do = tl.load(_tile_ptrs(DO, roq, coq, offs_d, sdo_y, sdo_x, sdo_c), mask=mask_q, other=0.0).to(DOT)
        k = tl.load(_tile_ptrs(K, rok, cok, offs_d, sk_y, sk_x, sk_c), mask=mask_k, other=0.0).to(DOT)
        v = tl.load(_tile_ptrs(V, rok, cok, offs_d, sv_y, sv_x, sv_c), mask=mask_k, other=0.0).to(DOT)
    else:
        s = tl.zeros([offs_m.shape[0], offs_n.shape[0]], dtype=ACC)
        dp = tl.zeros([offs_m.shape[0], offs_n.shape[0]], dtype=ACC)
        for dc in range(0, offs_d.shape[0], BLOCK_DC):
            offs_c = dc + tl.arange(0, BLOCK_DC)
            s = _dot_chunk(s, Q, roq, coq, offs_m < N, sq_y, sq_x, sq_c, K, rok, cok, offs_n < N, sk_y, sk_x, sk_c,
                           offs_c, D, DOT, PRECISION, ACC)
            dp = _dot_chunk(dp, DO, roq, coq, offs_m < N, sdo_y, sdo_x, sdo_c, V, rok, cok, offs_n < N, sv_y, sv_x,
                            sv_c, offs_c, D, DOT, PRECISION, ACC)
        k = tl.load(_tile_ptrs(K, rok, cok, offs_d, sk_y, sk_x, sk_c), mask=mask_k, other=0.0).to(DOT)
    pos = roq.to(tl.int64) * W + coq
    lse = tl.load(LSE + pos, mask=offs_m < N, other=float("inf"))
    delta = tl.load(DELTA + pos, mask=offs_m < N, other=0.0)
    valid = (offs_m[:, None] < N) & (offs_n[None, :] < N)
    extra = _bias_mask(TABLE, st_r, st_h, h, MASK, sm_w, sm_i, sm_j, mwid,
                       offs_m[:, None], yq[:, None], xq[:, None], rq[:, None], cq[:, None],
                       offs_n[None, :], yk[None, :], xk[None, :], rk[None, :], ck[None, :],
                       valid, H, W, SH, SW, WH, WW, HAS_BIAS, MASK_MODE, ACC)
    if BLOCK_DC == 0:
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
    s = s * qk_scale + extra * log2e
    p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
    if BLOCK_DC == 0:
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)
    return p * (dp - delta[:, None]), k


@triton.jit
def _win_bwd_dq_kernel(
    Q, K, V, DO, DQ,  # (B, H, W, C) token maps, any strides
    LSE, DELTA, TABLE, MASK,
    sq_b, sq_y, sq_x, sq_c, sk_b, sk_y, sk_x, sk_c, sv_b, sv_y, sv_x, sv_c, sdo_b, sdo_y, sdo_x, sdo_c,
    sdq_b, sdq_y, sdq_x, sdq_c,
    st_r, st_h, sm_w, sm_i, sm_j, NMW,
    H, W, D, NH, NWC, NQB,
    SH, SW, scale: tl.float64, qk_scale: tl.float64, log2e: tl.float64,  # shift; scalars as in the forward
    WH: tl.constexpr, WW: tl.constexpr, SHIFTED: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_MODE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DC: tl.constexpr = 0,  # as in the dK/dV kernel
):
    N: tl.constexpr = WH * WW
    if ACC != tl.float64:  # fp32 kernels convert the fp64 scalars once; float64 ones keep every bit
        scale, qk_scale, log2e = tl.cast(scale, ACC), tl.cast(qk_scale, ACC), tl.cast(log2e, ACC)
    wid, h, b, offs_m, mwid = _window_program(NQB, BLOCK_M, H, NWC, NMW, WH, MASK_MODE)
    offs_d = tl.arange(0, BLOCK_D)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, N, BLOCK_N):
        ds, k = _win_scores_grad(
            Q + b * sq_b + h * D * sq_c, K + b * sk_b + h * D * sk_c, V + b * sv_b + h * D * sv_c,
            DO + b * sdo_b + h * D * sdo_c, LSE + (b * NH + h) * H * W, DELTA + (b * NH + h) * H * W, TABLE, MASK,
            sq_y, sq_x, sq_c, sk_y, sk_x, sk_c, sv_y, sv_x, sv_c, sdo_y, sdo_x, sdo_c, st_r, st_h, sm_w, sm_i, sm_j,
            wid, mwid, h, offs_m, start_n + tl.arange(0, BLOCK_N), offs_d, H, W, D, NWC, SH, SW, qk_scale, log2e,
            WH, WW, SHIFTED, HAS_BIAS, MASK_MODE, ACC, PRECISION, DOT, BLOCK_DC,
        )
        dq += tl.dot(ds.to(K.dtype.element_ty).to(DOT), k, input_precision=PRECISION, out_dtype=ACC)
    dq = dq * scale
    _, _, _, _, roq, coq = _window_tokens(wid, offs_m, NWC, WH, WW, SH, SW, H, W, SHIFTED)
    tl.store(_tile_ptrs(DQ + b * sdq_b + h * D * sdq_c, roq, coq, offs_d, sdq_y, sdq_x, sdq_c),
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < N) & (offs_d[None, :] < D))


@triton.jit
def _win_bwd_dbias_kernel(
    Q, K, V, DO,  # (B, H, W, C) token maps, any strides
    LSE, DELTA, TABLE, MASK,
    PART,  # (S, NH, N, N) contiguous, ACC: dS summed over the (batch, window) pairs of each split
    sq_b, sq_y, sq_x, sq_c, sk_b, sk_y, sk_x, sk_c, sv_b, sv_y, sv_x, sv_c, sdo_b, sdo_y, sdo_x, sdo_c,
    st_r, st_h, sm_w, sm_i, sm_j, NMW,
    H, W, D, NH, NWC, NKB,
    NWIN,  # windows per image
    TOTAL,  # batch · NWIN: the (batch, window) pairs, split i taking i, i + S, i + 2S, ...
    SH, SW, scale: tl.float64, qk_scale: tl.float64, log2e: tl.float64,  # shift; scalars as in the forward
    WH: tl.constexpr, WW: tl.constexpr, SHIFTED: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_MODE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DC: tl.constexpr = 0,  # as in the dK/dV kernel
):
    N: tl.constexpr = WH * WW
    if ACC != tl.float64:  # fp32 kernels convert the fp64 scalars once; float64 ones keep every bit
        scale, qk_scale, log2e = tl.cast(scale, ACC), tl.cast(qk_scale, ACC), tl.cast(log2e, ACC)
    offs_m = (tl.program_id(0) // NKB) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tl.program_id(0) % NKB) * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for pair in range(split, TOTAL, tl.num_programs(2)):
        b = (pair // NWIN).to(tl.int64)
        wid = pair % NWIN
        ds, _ = _win_scores_grad(
            Q + b * sq_b + h * D * sq_c, K + b * sk_b + h * D * sk_c, V + b * sv_b + h * D * sv_c,
            DO + b * sdo_b + h * D * sdo_c, LSE + (b * NH + h) * H * W, DELTA + (b * NH + h) * H * W, TABLE, MASK,
            sq_y, sq_x, sq_c, sk_y, sk_x, sk_c, sv_y, sv_x, sv_c, sdo_y, sdo_x, sdo_c, st_r, st_h, sm_w, sm_i, sm_j,
            wid, pair % NMW, h, offs_m, offs_n, offs_d, H, W, D, NWC, SH, SW, qk_scale, log2e,
            WH, WW, SHIFTED, HAS_BIAS, MASK_MODE, ACC, PRECISION, DOT, BLOCK_DC,
        )
        acc += ds
    out = PART + (split.to(tl.int64) * NH + h) * N * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=(offs_m[:, None] < N) & (offs_n[None, :] < N))


@triton.jit
def _win_dbias_reduce_kernel(
    PART,  # (S, NH, N·N) contiguous, ACC: the dbias kernel's partial sums of dS per split
    PAIRS,  # (R, N) int64 contiguous: flat indices i·N + j of the pairs of each offset r, padded with N·N
    DTABLE,  # (R, NH) contiguous, the table's dtype: the table's gradient
    S, NH,  # splits, heads
    N: tl.constexpr,  # tokens per window (the most pairs an offset has)
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dtable[r, h] = Σ_s Σ_j part[s, h, pairs[r, j]], in a fixed order: one program per offset r."""
    r = tl.program_id(0).to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    offs_h = tl.arange(0, BLOCK_H)
    idx = tl.load(PAIRS + r * N + offs_p, mask=offs_p < N, other=N * N)
    valid = (idx[:, None] < N * N) & (offs_h[None, :] < NH)
    acc = tl.zeros([BLOCK_P, BLOCK_H], dtype=ACC)
    for split in range(0, S):
        ptrs = PART + (split * NH + offs_h[None, :]).to(tl.int64) * (N * N) + idx[:, None]
        acc += tl.load(ptrs, mask=valid, other=0.0)
    tl.store(DTABLE + r * NH + offs_h, tl.sum(acc, axis=0).to(DTABLE.dtype.element_ty), mask=offs_h < NH)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


# (kernel, padded head dim class, dtype class) -> (BLOCK_M, BLOCK_N, num_warps, num_stages[, BLOCK_DC])
# on a GPU; BLOCK_DC (backward kernels): S and dP summed over head-dim chunks of that width.
#   kernel: "fwd", "dkdv" (a program per BLOCK_N keys of a window, looping over BLOCK_M queries),
#     "dq", "dbias" (a program per BLOCK_M × BLOCK_N tile of the window's score matrix); the Δ kernel
#     takes the "fwd" BLOCK_M and num_warps;
#   head dim class: "d32" (BLOCK_D ≤ 32: SwinIR-light's 10, SwinIR's and HAT's 30), "d64", "d256";
#     fp32 has "d16" entries of its own for BLOCK_D = 16;
#   dtype class: "16bit", "fp32" (3×TF32 by default: more registers than one tf32 product), "fp64".
# Chosen from `python -m attnsr.kernels.compile_report --cases window` (triton 3.9, sm_90, a shifted
# window of 8 and of 16 with the bias table): the first setting tried with no spills and, for
# 16-bit and fp32, every dot on wgmma. The comment gives what was seen; "d256" entries are the
# small-tile rule, not checked (head dims above 64 are not what window transformers use).
_WIN_LAUNCH = {
    # 16-bit: 64×64/4/2 spills 40-72 B at window 16; 64×64/8/2: no spills, all HGMMA, D = 10, 30, 64
    # (dkdv: 64×64/8/2 spills 32 B at window 16 under triton 3.6; 32×64/8/2 is clean in both)
    **{(k, d, "16bit"): (64, 64, 8, 2) for k in ("fwd", "dq", "dbias") for d in ("d32", "d64")},
    **{("dkdv", d, "16bit"): (32, 64, 8, 2) for d in ("d32", "d64")},
    # fp32 (3×TF32), D ≤ 32: 64×32/8/2 no spills, HGMMA (dkdv spills 224-1176 B and runs HMMA there,
    # so it takes 32×64/8/2: no spills, 64-88 HGMMA)
    ("fwd", "d32", "fp32"): (64, 32, 8, 2),
    ("dkdv", "d32", "fp32"): (32, 64, 8, 2),
    ("dq", "d32", "fp32"): (64, 32, 8, 2),
    ("dbias", "d32", "fp32"): (64, 32, 8, 2),
    # fp32, BLOCK_D = 16 (SwinIR-light's D = 10): as "d32" with 4 warps. With 8 the two warp groups
    # split the 16-wide head dim into tf32 wgmma with N = 8, which read past their shared memory
    # (triton-lang/triton#10629; the same split in the fp32 attention dK/dV kernel gave an illegal
    # memory access on an H200)
    ("fwd", "d16", "fp32"): (64, 32, 4, 2),
    ("dkdv", "d16", "fp32"): (32, 64, 4, 2),
    ("dq", "d16", "fp32"): (64, 32, 4, 2),
    ("dbias", "d16", "fp32"): (64, 32, 4, 2),
    # fp32, D = 64: fwd 64×32/8/2 no spills, 68 HGMMA. The backward, holding its tiles, spilled on
    # every wgmma setting tried (dkdv 32×64/8/2 128 B, dq 64×32/8/2 344 B, dbias 64×32/8/2 328 B)
    # and ran mma.sync; with S and dP over 16-wide head-dim chunks (the 5th element: BLOCK_DC) it
    # is on wgmma, spill-free in triton 3.9 and 3.6 at windows 8 and 16: dkdv 16×64/4/2 235-247
    # registers (32×64/8/2 spills 64-112 B under 3.9), dq 64×32/8/2 186-198, dbias 64×32/8/2 178-188
    ("fwd", "d64", "fp32"): (64, 32, 8, 2),
    ("dkdv", "d64", "fp32"): (16, 64, 4, 2, 16),
    ("dq", "d64", "fp32"): (64, 32, 8, 2, 16),
    ("dbias", "d64", "fp32"): (64, 32, 8, 2, 16),
    # fp64 (FMA units): 16×32/4/1 no spills (32×32/4/1 spills 88-104 B); dkdv 16×16/4/1 (16×32/4/1
    # spills 8 B at D = 10, window 16, and 16-24 B at D = 64 under triton 3.6)
    **{(k, d, "fp64"): (16, 32, 4, 1) for k in ("fwd", "dq", "dbias") for d in ("d32", "d64")},
    **{("dkdv", d, "fp64"): (16, 16, 4, 1) for d in ("d32", "d64")},
    **{(k, "d256", c): (16, 16, 4, 1) for k in ("fwd", "dkdv", "dq", "dbias") for c in ("16bit", "fp32", "fp64")},
}


_LAUNCH_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "BLOCK_DC")
_KERNELS = ("fwd", "dkdv", "dq", "dbias")
_OVERRIDES = {}  # kernel -> launch settings replacing its table entry (set by _launch_override only)


def _check_launch(kernel: str, cfg: dict) -> None:
    check_launch_settings("window _launch_override", kernel, cfg, _KERNELS, _LAUNCH_KEYS)


@contextlib.contextmanager
def _launch_override(kernel: str, **cfg):
    """Inside the ``with`` block, launch ``kernel`` ("fwd", "dkdv", "dq" or "dbias") with ``cfg`` in
    place of its table entry, for every head dim and dtype. For the tuner and the tests."""
    _check_launch(kernel, cfg)
    with overriding(_OVERRIDES, kernel, cfg):
        yield


def _config(kernel: str, head_dim: int, dtype: torch.dtype, tokens: int = 0, device=None):
    """(block constexprs, launch settings) of ``kernel``: the tuner's override where one is set,
    else the setting measured on ``device`` for windows of ``tokens`` tokens (``attnsr tune``),
    else the ``_WIN_LAUNCH`` entry on a GPU; 32×32 tiles under the interpreter, so that a window
    of 64 tokens spans two tiles in the tests."""
    block_d = max(16, next_pow2(head_dim))
    tuned = None
    if device is not None and kernel not in _OVERRIDES and _tuned.table(device):
        key = _tuned.window_key(kernel, block_d, dtype, dot_precision(dtype), tokens)
        tuned = _tuned.launch_setting(device, key)
        if tuned is not None:
            try:
                _check_launch(kernel, tuned)
                if "BLOCK_M" not in tuned or "BLOCK_N" not in tuned:
                    raise ValueError("it lacks BLOCK_M or BLOCK_N")
            except ValueError as why:
                warnings.warn(f"attnsr: the tuned setting {key} is not usable ({why}); the shipped one applies",
                              stacklevel=2)
                tuned = None
    if tuned is not None:
        cfg = dict(tuned)
    elif interpreting():
        cfg = dict(BLOCK_M=32, BLOCK_N=32)
    else:
        d = "d32" if block_d <= 32 else "d64" if block_d <= 64 else "d256"
        c = {torch.float16: "16bit", torch.bfloat16: "16bit", torch.float32: "fp32", torch.float64: "fp64"}[dtype]
        if block_d == 16 and (kernel, "d16", c) in _WIN_LAUNCH:  # fp32 only: its own entries
            d = "d16"
        bm, bn, warps, stages, *chunk = _WIN_LAUNCH[(kernel, d, c)]
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        if chunk:  # S and dP over head-dim chunks (the backward kernels)
            cfg["BLOCK_DC"] = chunk[0]
    cfg.update(_OVERRIDES.get(kernel, {}))
    blocks = dict(BLOCK_M=cfg.pop("BLOCK_M"), BLOCK_N=cfg.pop("BLOCK_N"), BLOCK_D=block_d)
    chunk = cfg.pop("BLOCK_DC", 0)
    if chunk and kernel != "fwd":
        blocks["BLOCK_DC"] = min(chunk, block_d)
    return blocks, cfg


class _Geometry:
    """Everything a launch derives from the call: sizes, windows, flags, the optional tensors."""

    def __init__(self, q, table, mask, window, shift, heads, swin_mask=True):
        self.batch, self.height, self.width, channels = q.shape
        self.wh, self.ww = window
        self.sh, self.sw = shift
        self.heads = heads
        self.head_dim = channels // heads
        self.n = self.wh * self.ww
        self.nwc = self.width // self.ww
        self.nwin = (self.height // self.wh) * self.nwc
        self.has_bias = table is not None
        self.mask_mode = (MASK_GIVEN if mask is not None else MASK_SWIN if (self.sh or self.sw) and swin_mask
                          else MASK_NONE)
        self.table = table if table is not None else q  # any pointer: unused when HAS_BIAS is off
        self.mask = mask if mask is not None else q
        self.table_strides = table.stride() if table is not None else (0, 0)
        # the mask's strides and its window count (the batch's windows cycle through them)
        self.mask_strides = (*mask.stride(), mask.shape[0]) if mask is not None else (0, 0, 0, 1)

    def constexprs(self, dtype: torch.dtype) -> dict:
        return dict(WH=self.wh, WW=self.ww, SHIFTED=bool(self.sh or self.sw), HAS_BIAS=self.has_bias,
                    MASK_MODE=self.mask_mode, ACC=acc_dtype(dtype), PRECISION=dot_precision(dtype),
                    DOT=dot_dtype(dtype))

    def extras(self):
        return (self.table, self.mask)

    def extra_strides(self):
        return (*self.table_strides, *self.mask_strides)


_FORWARD_PLANS = LaunchPlans()
_BACKWARD_PLANS = LaunchPlans()


def _call_key(geo: "_Geometry", q, k, v, scale: float) -> tuple:
    """What a call's launches depend on besides the tensors' addresses (see ``LaunchPlans``)."""
    return (q.dtype, q.device, q.shape, q.stride(), k.stride(), v.stride(), geo.wh, geo.ww, geo.sh, geo.sw,
            geo.heads, geo.has_bias, geo.mask_mode, geo.table_strides, geo.mask_strides,
            geo.table.dtype if geo.has_bias else None, geo.mask.dtype if geo.mask_mode == MASK_GIVEN else None,
            scale)


def window_forward(q, k, v, geo: _Geometry, scale: float, plans=None):
    """Launch the forward kernel. Returns (out (B, H, W, C) contiguous, LSE (B, heads, H·W) base 2).
    ``plans``: the launch plans of the call's signature where the caller keeps them (a dict;
    ``LaunchPlans``), else the launcher's own, keyed by shapes and strides."""
    out = poison(torch.empty(q.shape, dtype=q.dtype, device=q.device))
    lse = torch.empty((geo.batch, geo.heads, geo.height * geo.width), dtype=stat_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out, lse

    def launch():
        blocks, settings = _config("fwd", geo.head_dim, q.dtype, geo.n, q.device)
        nqb = triton.cdiv(geo.n, blocks["BLOCK_M"])
        _win_fwd_kernel[(geo.nwin * nqb, geo.heads, geo.batch)](
            q, k, v, out, lse, *geo.extras(),
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *geo.extra_strides(),
            geo.height, geo.width, geo.head_dim, geo.heads, geo.nwc, nqb, geo.sh, geo.sw, scale, scale * LOG2E,
            LOG2E, **geo.constexprs(q.dtype), **blocks, **settings,
        )

    # a call record serves every batch slice of its call (``window_attention``): the batch is in the key
    key = _call_key(geo, q, k, v, scale) if plans is None else ("fwd", dot_precision(q.dtype), geo.batch)
    _FORWARD_PLANS.launch(key, (q, k, v, *geo.extras(), out, lse), launch, plans, given=5)
    return out, lse


@functools.lru_cache(maxsize=32)
def _offset_pairs(wh: int, ww: int, device: torch.device) -> torch.Tensor:
    """(R, wh·ww) flat indices i·N + j of the (query, key) pairs of each relative offset r of the
    bias table, padded with N·N (past the end): dtable[r] = Σ over row r of dS's gathered pairs."""
    n = wh * ww
    t = torch.arange(n)
    y, x = t // ww, t % ww
    idx = ((y[:, None] - y[None, :] + wh - 1) * (2 * ww - 1) + (x[:, None] - x[None, :] + ww - 1)).flatten()
    order = torch.argsort(idx, stable=True)
    counts = torch.bincount(idx, minlength=(2 * wh - 1) * (2 * ww - 1))
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n * n) - starts[idx[order]]
    pairs = torch.full((counts.numel(), n), n * n, dtype=torch.int64)
    pairs[idx[order], slot] = order
    return pairs.to(device)


@functools.lru_cache(maxsize=256)
def _dbias_tiles(n: int, heads: int, pairs: int, block_m: int, block_n: int, interpreted: bool) -> tuple:
    """(splits, tile rows, tile columns) of the bias-gradient kernel's grid: the N×N score matrix in
    BLOCK_M × BLOCK_N tiles, and per tile and head ``splits`` programs sharing the (batch, window)
    pairs: about two waves of a 132-SM GPU in all (two programs under the interpreter), never more
    than there are pairs."""
    rows, cols = -(-n // block_m), -(-n // block_n)
    if interpreted:
        return min(2, pairs), rows, cols
    return max(1, min(pairs, -(-264 // (rows * cols * heads)))), rows, cols


def window_backward(do, q, k, v, out, lse, geo: _Geometry, scale: float, need_qkv: bool, need_table: bool,
                    grads=None, plans=None):
    """Launch the backward kernels. ``do`` may have any strides (stride 0 included).

    Returns (dq, dk, dv, dtable); what is not needed comes back as an empty (0,) tensor. ``grads``:
    (dq, dk, dv) to write into (views of one buffer laid out like the fused qkv projection, say)
    instead of fresh tensors. ``plans``: as in ``window_forward``.
    """
    if grads is not None:
        dq, dk, dv = grads
    else:
        dq, dk, dv = (poison(torch.empty(q.shape, dtype=q.dtype, device=q.device)) if need_qkv else absent_output(q)
                      for _ in range(3))
    dtable = absent_output(q)
    if q.numel() == 0:
        if need_table:
            dtable = torch.zeros_like(geo.table)
        return dq.zero_(), dk.zero_(), dv.zero_(), dtable
    delta = torch.empty_like(lse)
    part = pairs = None
    if need_table:
        dtable = poison(torch.empty(geo.table.shape, dtype=geo.table.dtype, device=q.device))
        dbias_blocks, dbias_settings = _config("dbias", geo.head_dim, q.dtype, geo.n, q.device)
        splits, tile_rows, tile_cols = _dbias_tiles(geo.n, geo.heads, geo.batch * geo.nwin, dbias_blocks["BLOCK_M"],
                                                    dbias_blocks["BLOCK_N"], interpreting())
        part = torch.empty((splits, geo.heads, geo.n, geo.n), dtype=stat_dtype(q.dtype), device=q.device)
        pairs = _offset_pairs(geo.wh, geo.ww, q.device)

    def launch():
        constexprs = geo.constexprs(q.dtype)
        blocks, settings = _config("fwd", geo.head_dim, q.dtype, geo.n, q.device)
        _win_delta_kernel[(triton.cdiv(geo.height * geo.width, blocks["BLOCK_M"]), geo.heads, geo.batch)](
            out, do, delta, *out.stride(), *do.stride(), geo.height, geo.width, geo.head_dim, geo.heads,
            ACC=constexprs["ACC"], BLOCK_M=blocks["BLOCK_M"], BLOCK_D=blocks["BLOCK_D"],
            num_warps=settings.get("num_warps", 4),
        )
        strides_in = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
        sizes = (geo.height, geo.width, geo.head_dim, geo.heads, geo.nwc)
        if need_qkv:
            blocks, settings = _config("dkdv", geo.head_dim, q.dtype, geo.n, q.device)
            nkb = triton.cdiv(geo.n, blocks["BLOCK_N"])
            _win_bwd_dkdv_kernel[(geo.nwin * nkb, geo.heads, geo.batch)](
                q, k, v, do, dk, dv, lse, delta, *geo.extras(),
                *strides_in, *dk.stride(), *dv.stride(), *geo.extra_strides(),
                *sizes, nkb, geo.sh, geo.sw, scale, scale * LOG2E, LOG2E, **constexprs, **blocks, **settings,
            )
            blocks, settings = _config("dq", geo.head_dim, q.dtype, geo.n, q.device)
            nqb = triton.cdiv(geo.n, blocks["BLOCK_M"])
            _win_bwd_dq_kernel[(geo.nwin * nqb, geo.heads, geo.batch)](
                q, k, v, do, dq, lse, delta, *geo.extras(),
                *strides_in, *dq.stride(), *geo.extra_strides(),
                *sizes, nqb, geo.sh, geo.sw, scale, scale * LOG2E, LOG2E, **constexprs, **blocks, **settings,
            )
        if need_table:
            _win_bwd_dbias_kernel[(tile_rows * tile_cols, geo.heads, part.shape[0])](
                q, k, v, do, lse, delta, *geo.extras(), part,
                *strides_in, *geo.extra_strides(),
                *sizes, tile_cols, geo.nwin, geo.batch * geo.nwin, geo.sh, geo.sw, scale, scale * LOG2E, LOG2E,
                **constexprs, **dbias_blocks, **dbias_settings,
            )
            _win_dbias_reduce_kernel[(pairs.shape[0],)](  # fixed-order sums over the splits and each offset's pairs
                part, pairs, dtable, part.shape[0], geo.heads, N=geo.n, ACC=constexprs["ACC"],
                BLOCK_P=next_pow2(geo.n), BLOCK_H=next_pow2(geo.heads),
            )

    # the batch (see window_forward) and the saved q, k, v and out's strides (a saved-tensor hook may
    # hand them back with others than the call's signature says) are in the key
    key = (_call_key(geo, q, k, v, scale) if plans is None else ("bwd", dot_precision(q.dtype), geo.batch,
                                                                q.stride(), k.stride(), v.stride(),
                                                                geo.table_strides, geo.mask_strides),
           out.stride(), do.stride(), dq.stride(), dk.stride(), dv.stride(), need_qkv, need_table)
    # dq, dk, dv may be views of the caller's buffer: their alignment is looked at too
    tensors = (do, q, k, v, out, dq, dk, dv, *geo.extras(), lse, delta, dtable)
    if need_table:
        tensors = (*tensors, part, pairs)
    _BACKWARD_PLANS.launch(key, tensors, launch, plans, given=10)
    return dq, dk, dv, dtable


# ----------------------------------------------------------------------------------------------
# Autograd and torch.compile: two torch.library custom ops with fake (meta) kernels
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("attnsr::window_attention", mutates_args=())
@on_tensor_device
def _window_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor | None, mask: torch.Tensor | None,
    window: list[int], shift: list[int], heads: int, scale: float, swin_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return window_forward(q, k, v, _Geometry(q, table, mask, window, shift, heads, swin_mask), scale)


@_window_op.register_fake
def _(q, k, v, table, mask, window, shift, heads, scale, swin_mask):
    b, h, w, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, heads, h * w),
                                                                                      dtype=stat_dtype(q.dtype))


@torch.library.custom_op("attnsr::window_attention_backward", mutates_args=())
@on_tensor_device
def _window_backward_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    table: torch.Tensor | None, mask: torch.Tensor | None, window: list[int], shift: list[int], heads: int,
    scale: float, swin_mask: bool, need_qkv: bool, need_table: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    geo = _Geometry(q, table, mask, window, shift, heads, swin_mask)
    return window_backward(do, q, k, v, out, lse, geo, scale, need_qkv, need_table)


@_window_backward_op.register_fake
def _(do, q, k, v, out, lse, table, mask, window, shift, heads, scale, swin_mask, need_qkv, need_table):
    grads = [torch.empty_like(q, memory_format=torch.contiguous_format) if need_qkv else absent_output(q)
             for _ in range(3)]
    return (*grads, table.new_empty(table.shape) if need_table else absent_output(q))


def _setup_context(ctx, inputs, output):
    q, k, v, table, mask, window, shift, heads, scale, swin_mask = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, table, mask)
    ctx.meta = (window, shift, heads, scale, swin_mask)


def _backward(ctx, do, _dlse):
    q, k, v, out, lse, table, mask = ctx.saved_tensors
    need_q, need_k, need_v, need_table = ctx.needs_input_grad[:4]
    need_qkv = need_q or need_k or need_v
    dq, dk, dv, dtable = _window_backward_op(do, q, k, v, out, lse, table, mask, *ctx.meta, need_qkv,
                                             bool(need_table and table is not None))
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None,
            dtable if need_table else None, None, None, None, None, None, None)


_window_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast(_window_op, "window_attention", cast_first=3)  # q, k, v; the table and mask keep theirs


refuse_double_backward(_window_backward_op, "window_attention")


class _Call:
    """What the checks of a call derived, kept per call signature (``ValidCalls``) with the launch
    plans of its forward and backward."""

    __slots__ = ("heads", "most", "plans", "scale", "shift", "swin_mask", "window")

    def __init__(self, window, shift, heads, scale, swin_mask, most):
        self.window, self.shift, self.heads, self.scale = window, shift, heads, scale
        self.swin_mask, self.most = swin_mask, most
        self.plans = {}


class _WindowFunction(torch.autograd.Function):
    """The eager path of ``window_attention``: the launchers called directly (the custom ops above
    serve torch.compile). With ``base`` (the packed qkv map q, k, v are views of, from
    ``window_attention_qkv``), q, k, v come detached and the backward returns one gradient for it."""

    @staticmethod
    def forward(ctx, q, k, v, table, mask, base, call):
        geo = _Geometry(q, table, mask, call.window, call.shift, call.heads, call.swin_mask)
        with device_guard(q):
            out, lse = window_forward(q, k, v, geo, call.scale, call.plans)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse, table, mask, base)
        ctx.call = call
        ctx.grad_layout = None if base is None else grad_layout(base, (q, k, v))
        return out

    @staticmethod
    def backward(ctx, do):
        if do is None:
            return None, None, None, None, None, None, None
        q, k, v, out, lse, table, mask, base = ctx.saved_tensors
        call = ctx.call
        need_q, need_k, need_v, need_table = ctx.needs_input_grad[:4]
        need_table = bool(need_table and table is not None)
        geo = _Geometry(q, table, mask, call.window, call.shift, call.heads, call.swin_mask)
        dbase, grads = grad_views(ctx.grad_layout) if base is not None else (None, None)
        need_qkv = base is not None or need_q or need_k or need_v
        with device_guard(q):
            dq, dk, dv, dtable = window_backward(do, q, k, v, out, lse, geo, call.scale, need_qkv, need_table,
                                                 grads, call.plans)
        if base is not None:
            dbase, dtable = refuse_twice("window_attention", (base, table), (dbase, dtable if need_table else None))
            return None, None, None, dtable, None, dbase, None
        dq, dk, dv, dtable = refuse_twice("window_attention", (q, k, v, table),
                                          (dq if need_q else None, dk if need_k else None, dv if need_v else None,
                                           dtable if need_table else None))
        return dq, dk, dv, dtable, None, None, None


_apply = super(torch.autograd.Function, _WindowFunction).apply  # Function.apply less its Python wrapper


def _window_call(q, k, v, table, mask, call: _Call, packed=None):
    """One window attention call (one batch slice): the custom op under torch.compile and torch.func
    transforms (as before the eager path existed), else the eager Function. ``packed``: the qkv map
    q, k, v were split from by ``window_attention_qkv``, or None."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return _window_op(q, k, v, table, mask, list(call.window), list(call.shift), call.heads, float(call.scale),
                          call.swin_mask)[0]
    base = None if packed is None else packed_base(packed)
    if base is not None:
        q, k, v = q.detach(), k.detach(), v.detach()
    return _apply(q, k, v, table, mask, base, call)


def _describe(t):
    """A bias table or mask argument as the call signature holds it."""
    return (t.shape, t.stride(), t.dtype, t.device, t.requires_grad) if isinstance(t, torch.Tensor) else t


_CALLS = ValidCalls()


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def _pair(op: str, name: str, value, low: int) -> tuple:
    """An int or a pair of ints, each at least ``low``, as a pair."""
    values = (value, value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    if hasattr(values, "__len__") and not isinstance(values, (str, bytes)) and len(values) != 2:  # a bad value
        raise ValueError(f"{op}: {name} = {value!r} has {len(values)} value{'' if len(values) == 1 else 's'}; "
                         f"expected an int or a pair of ints")
    try:
        a, b = values
        if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in (a, b)):
            raise TypeError
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}") from None
    if a < low or b < low:
        raise ValueError(f"{op}: {name} = {value!r}; expected values of at least {low}")
    return int(a), int(b)


def check_window_args(q, k, v, window_size, shift_size, heads, bias_table, mask, scale):
    """Validate a window attention call (any backend); return (q, k, v cast under autocast, heads,
    (wh, ww), (sh, sw), mask, scale) with defaults resolved. ``mask``: None, False or a tensor."""
    op = "window_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t)
        check_rank(op, name, t, 4, "(B, H, W, C)")
    check_no_forward_ad(op, q, k, v, bias_table)
    q, k, v = autocast_inputs(q, k, v)  # the bias table and the mask keep their dtype (added in fp32)
    check_same(op, {"q": q, "k": k, "v": v})
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{op}: q is {tuple(q.shape)} but {name} is {tuple(t.shape)}; q, k and v must share "
                             "(B, H, W, C)")
    batch, height, width, channels = q.shape
    heads = positive_int(op, "heads", heads)
    wh, ww = _pair(op, "window_size", window_size, 1)
    sh, sw = _pair(op, "shift_size", shift_size, 0)
    if height % wh or width % ww:
        raise ValueError(f"{op}: window_size {wh}×{ww} does not divide the map's H×W = {height}×{width}")
    if sh >= wh or sw >= ww:
        raise ValueError(f"{op}: shift_size {sh}×{sw} must be smaller than the window {wh}×{ww}")
    if channels % heads:
        raise ValueError(f"{op}: heads = {heads} does not divide C = {channels}")
    head_dim = channels // heads
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim C/heads = {head_dim} is above the kernel's limit {MAX_HEAD_DIM}")
    n = wh * ww
    if bias_table is not None:
        check_tensor(op, "bias_table", bias_table)
        want = ((2 * wh - 1) * (2 * ww - 1), heads)
        if tuple(bias_table.shape) != want:
            raise ValueError(f"{op}: bias_table is {tuple(bias_table.shape)}; expected {want} for a {wh}×{ww} "
                             f"window and {heads} heads")
        if bias_table.device != q.device:
            raise ValueError(f"{op}: bias_table is on {bias_table.device} but q is on {q.device}")
    if mask is not None and mask is not False:
        check_tensor(op, "mask", mask)
        windows = batch * (height // wh) * (width // ww)
        m = mask.shape[0] if mask.dim() == 3 else 0
        if mask.dim() != 3 or tuple(mask.shape[1:]) != (n, n) or m < 1 or windows % m:
            raise ValueError(f"{op}: mask is {tuple(mask.shape)}; expected (M, N, N) with N = {n} and M ≥ 1 "
                             f"dividing the batch's {windows} windows")
        if mask.device != q.device:
            raise ValueError(f"{op}: mask is on {mask.device} but q is on {q.device}")
        mask = mask.detach()
    scale = check_scale(op, scale, head_dim)
    return q, k, v, heads, (wh, ww), (sh, sw), mask, scale


def window_attention(q, k, v, *, window_size, shift_size=0, heads=1, bias_table=None, mask=None, scale=None):
    """Swin window attention (W-MSA, or SW-MSA with a shift), fused, forward and backward.

    q, k, v: (B, H, W, C) token maps with any strides, e.g. ``qkv.view(B, H, W, 3 * C).split(C, -1)``
    of one qkv projection of a (B, H·W, C) sequence (SwinIR's layout), or NCHW maps through
    ``x.permute(0, 2, 3, 1)``. Head h owns channels [h·C/heads, (h+1)·C/heads).
    window_size: Wh or (Wh, Ww), dividing H and W. shift_size: s or (sh, sw), 0 ≤ s < window side;
    a shifted call masks, as Swin does, the pairs of tokens that the roll brought together (−100),
    unless ``mask`` is given (or False: no mask at all).
    bias_table: ((2Wh−1)(2Ww−1), heads) relative position bias table (Swin's
    ``relative_position_bias_table``), gathered in the kernel; it gets a gradient.
    mask: an additive (M, N, N) mask, N = Wh·Ww; it gets no gradient. The batch's windows, numbered
    b·nW + w (nW = H/Wh · W/Ww per map, row-major in the rolled map), take mask[(b·nW + w) mod M]:
    M = nW broadcasts one (nW, N, N) mask over the batch; with a batch of maps of one window each
    (SwinIR's partitioned windows, (B·nW, Wh, Ww, C)), M = nW cycles as SwinIR's broadcast does;
    M = 1 gives every window the same mask. M must divide the batch's B·nW windows.
    scale defaults to (C/heads)^−½. Returns (B, H, W, C), contiguous. A batch larger than the GPU's
    grid allows (65535) runs in slices, each starting at mask slice 0.
    """
    return _window_attention(q, k, v, window_size, shift_size, heads, bias_table, mask, scale, None)


def window_attention_qkv(qkv, *, window_size, shift_size=0, heads=1, bias_table=None, mask=None, scale=None):
    """``window_attention`` of the three parts of one packed map, q, k, v = qkv.split(C, -1).

    qkv: (B, H, W, 3C), any strides (the (B, H·W, 3C) output of one qkv Linear viewed as a map, as
    SwinIR and HAT compute it); the other arguments as in ``window_attention``. Returns
    (B, H, W, C). Where qkv needs a gradient, the backward writes dq, dk and dv into one buffer laid
    out like qkv and hands it to autograd whole: no ``cat`` of three gradients.
    """
    op = "window_attention_qkv"
    check_tensor(op, "qkv", qkv)
    check_rank(op, "qkv", qkv, 4, "(B, H, W, 3C)")
    if qkv.shape[-1] % 3:
        raise ValueError(f"{op}: qkv is {tuple(qkv.shape)}; expected (B, H, W, 3C), 3C channels in all")
    (qkv,) = autocast_inputs(qkv)
    q, k, v = qkv.split(qkv.shape[-1] // 3, -1)
    return _window_attention(q, k, v, window_size, shift_size, heads, bias_table, mask, scale, qkv)


def _window_attention(q, k, v, window_size, shift_size, heads, bias_table, mask, scale, packed):
    """``window_attention``, and ``window_attention_qkv`` with ``packed``: the qkv map q, k, v are
    the parts of."""
    op = "window_attention"
    q, k, v = autocast_inputs(q, k, v)  # first: a call under autocast is looked up by the dtype it runs in
    sig, call = _CALLS.lookup((q, k, v), (op, window_size, shift_size, heads, scale, _describe(bias_table),
                                          _describe(mask)))
    if call is None:
        q, k, v, heads, window, shift, mask, scale = check_window_args(q, k, v, window_size, shift_size, heads,
                                                                       bias_table, mask, scale)
        batch, height, width, _ = q.shape
        check_runnable(op, q.device)
        if heads > MAX_GRID_YZ:
            raise ValueError(f"{op}: heads = {heads}; the kernels take at most {MAX_GRID_YZ}")
        if height * width > MAX_INDEX:
            raise ValueError(f"{op}: a map of {height * width} tokens; the kernels handle at most {MAX_INDEX}")
        nwin = (height // window[0]) * (width // window[1])
        # slices of the batch that start at mask slice 0 and keep each slice's tokens within the index limit
        given = mask is not None and mask is not False
        step = 1 if not given else mask.shape[0] // math.gcd(mask.shape[0], nwin)
        most = max(step, min(MAX_GRID_YZ, MAX_INDEX // max(1, height * width)) // step * step)
        if most > MAX_GRID_YZ:
            raise ValueError(f"{op}: a mask of {mask.shape[0]} slices over maps of {nwin} windows repeats only "
                             f"every {step} maps, more than the kernels' {MAX_GRID_YZ} per launch")
        call = _Call(window, shift, heads, float(scale), mask is not False, most)
        _CALLS.remember(sig, call)
    elif not q.is_cuda:
        check_runnable(op, q.device)
    if mask is False:
        mask = None
    elif mask is not None:
        mask = mask.detach()
    batch, most = q.shape[0], call.most
    if batch <= most:
        return _window_call(q, k, v, bias_table, mask, call, packed)
    outs = [_window_call(q[i:i + most], k[i:i + most], v[i:i + most], bias_table, mask, call)
            for i in range(0, batch, most)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)
