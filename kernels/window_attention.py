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
scheme); saves LSE per query token. One launch.
Backward, one launch where a key block covers the window (its dK/dV entry's DQ flag set: 16-bit
windows of up to 64 tokens, and every window of up to BLOCK_N tokens under the interpreter), else
two, plus one small reduction when the bias table needs a gradient:
  - dK/dV pass, a program per key block of a window and head: for each query block it forms
    Δ = rowsum(dO ∘ O) from O and dO (no Δ pass), recomputes P from LSE, adds Pᵀ dO to dV and
    dSᵀ Q to dK, and where its key block is the whole window, writes dQ = dS K of the query block
    (complete: no other program adds to it). The bias-table gradient
    dtable[r, h] = Σ over batch, windows and pairs (i, j) with offset r of dS[i, j] starts here:
    dSᵀ is summed into fp32 (N, N) tiles per head, in one of two ways.
    Fast (``torch.are_deterministic_algorithms_enabled()`` false): a program per (batch, window),
    atomics (fp32; float64 for float64) into zeroed slots, pair p into slot p mod S (S as many
    as PART_BYTES allow, so few programs add into one address).
    Deterministic: S splits of the (batch, window) pairs, a program taking pairs s, s + S, ... and
    adding its key rows of dS into its split's slot, rows no other program touches, with a
    barrier between pairs: each element's sum runs in pair order, whatever the timing.
  - dQ pass (windows wider than a key block): a program per query block, Δ formed once, looping
    over the window's key blocks.
  - reduction: one program per table row sums, in a fixed order, over the slots and over the pairs
    of its offset (a padded gather). Deterministic mode: two runs give bitwise-equal gradients;
    dQ, dK and dV are deterministic in both modes (each written once, in a fixed order).

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
def _delta_rows(O, DO, ro, co, rows, so_y, so_x, so_c, sdo_y, sdo_x, sdo_c, D,
                ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr):
    """Δ = rowsum(dO ∘ O) of the tokens at map rows ro, columns co (``rows``: which exist), over
    head-dim chunks of BLOCK_DC features (the whole BLOCK_D when 0). O and DO point at the head."""
    CH: tl.constexpr = BLOCK_DC if BLOCK_DC > 0 else BLOCK_D
    delta = tl.zeros([ro.shape[0]], dtype=ACC)
    for dc in range(0, BLOCK_D, CH):
        offs_c = dc + tl.arange(0, CH)
        m = rows[:, None] & (offs_c[None, :] < D)
        o = tl.load(_tile_ptrs(O, ro, co, offs_c, so_y, so_x, so_c), mask=m, other=0.0)
        do = tl.load(_tile_ptrs(DO, ro, co, offs_c, sdo_y, sdo_x, sdo_c), mask=m, other=0.0)
        delta += tl.sum(o.to(ACC) * do.to(ACC), 1)
    return delta


@triton.jit
def _win_bwd_dkdv_kernel(
    Q, K, V, O, DO,  # (B, H, W, C) token maps, any strides (DO: stride 0 too)
    DQ, DK, DV,  # (B, H, W, C) gradients, any strides (DQ: written here when WITH_DQ)
    LSE,  # (B, NH, H·W) contiguous, ACC: the forward's log2-sum-exp2
    TABLE, MASK,  # as in the forward
    PART,  # (S, NH, N, N) contiguous, zeroed, ACC: dS summed per slot, [key j, query i] (DBIAS 1 and 2)
    sq_b, sq_y, sq_x, sq_c, sk_b, sk_y, sk_x, sk_c, sv_b, sv_y, sv_x, sv_c, so_b, so_y, so_x, so_c,
    sdo_b, sdo_y, sdo_x, sdo_c, sdq_b, sdq_y, sdq_x, sdq_c, sdk_b, sdk_y, sdk_x, sdk_c, sdv_b, sdv_y, sdv_x, sdv_c,
    st_r, st_h, sm_w, sm_i, sm_j, NMW,
    H, W, D, NH, NWC, NKB,  # NKB: key blocks per window
    NWIN, TOTAL,  # windows per image; batch · NWIN (batch, window) pairs, numbered b·NWIN + w
    SLOTS,  # DBIAS 1: PART's slots, pair p adding into slot p mod SLOTS
    SH, SW, scale: tl.float64, qk_scale: tl.float64, log2e: tl.float64,  # shift; scalars as in the forward
    WH: tl.constexpr, WW: tl.constexpr, SHIFTED: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_MODE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DC: tl.constexpr = 0,  # 0: hold K and V; else Sᵀ and dPᵀ over head-dim chunks this wide
    NEED_QKV: tl.constexpr = True,  # write dK, dV (and dQ with WITH_DQ); False: the table's gradient only
    WITH_DQ: tl.constexpr = False,  # one key block covers the window (NKB = 1): dQ = dS K here, whole
    DBIAS: tl.constexpr = 0,  # 0: no table gradient; 1: dS into PART[pair mod SLOTS]; 2: into PART[split]
):
    """Program (split, key block) of a (splits · NKB, heads) grid: for the (batch, window) pairs
    split, split + S, split + 2S, ... (S = grid width / NKB), dK and dV of the block's keys, dQ of
    the window's queries (WITH_DQ), Δ of each query block on the fly, and dS summed for the table."""
    N: tl.constexpr = WH * WW
    if ACC != tl.float64:  # fp32 kernels convert the fp64 scalars once; float64 ones keep every bit
        scale, qk_scale, log2e = tl.cast(scale, ACC), tl.cast(qk_scale, ACC), tl.cast(log2e, ACC)
    split = tl.program_id(0) // NKB
    splits = tl.num_programs(0) // NKB
    offs_n = (tl.program_id(0) % NKB) * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_k = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    if DBIAS == 1:
        part = PART + h * N * N + offs_n[:, None] * N
    else:
        part = PART + (split.to(tl.int64) * NH + h) * N * N + offs_n[:, None] * N
    for pair in range(split, TOTAL, splits):
        b = (pair // NWIN).to(tl.int64)
        wid = pair % NWIN
        if MASK_MODE == 2:
            mwid = pair % NMW
        else:
            mwid = wid
        stats = LSE + (b * NH + h) * H * W
        yk, xk, rk, ck, rok, cok = _window_tokens(wid, offs_n, NWC, WH, WW, SH, SW, H, W, SHIFTED)
        Kb = K + b * sk_b + h * D * sk_c
        Vb = V + b * sv_b + h * D * sv_c
        Qb = Q + b * sq_b + h * D * sq_c
        Ob = O + b * so_b + h * D * so_c
        DOb = DO + b * sdo_b + h * D * sdo_c
        if DBIAS == 1:  # this pair's slot (contention: TOTAL / SLOTS pairs add into each element)
            slot = part + (pair % SLOTS).to(tl.int64) * NH * N * N
        else:
            slot = part
        if BLOCK_DC == 0:
            k = tl.load(_tile_ptrs(Kb, rok, cok, offs_d, sk_y, sk_x, sk_c), mask=mask_k, other=0.0).to(DOT)
            v = tl.load(_tile_ptrs(Vb, rok, cok, offs_d, sv_y, sv_x, sv_c), mask=mask_k, other=0.0).to(DOT)
        elif WITH_DQ and NEED_QKV:
            k = tl.load(_tile_ptrs(Kb, rok, cok, offs_d, sk_y, sk_x, sk_c), mask=mask_k, other=0.0).to(DOT)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            yq, xq, rq, cq, roq, coq = _window_tokens(wid, offs_m, NWC, WH, WW, SH, SW, H, W, SHIFTED)
            mask_q = (offs_m[:, None] < N) & (offs_d[None, :] < D)
            if BLOCK_DC != 0:
                s_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
                dp_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
                for dc in range(0, BLOCK_D, BLOCK_DC):
                    offs_c = dc + tl.arange(0, BLOCK_DC)
                    s_t = _dot_chunk(s_t, Kb, rok, cok, offs_n < N, sk_y, sk_x, sk_c, Qb, roq, coq, offs_m < N,
                                     sq_y, sq_x, sq_c, offs_c, D, DOT, PRECISION, ACC)
                    dp_t = _dot_chunk(dp_t, Vb, rok, cok, offs_n < N, sv_y, sv_x, sv_c, DOb, roq, coq, offs_m < N,
                                      sdo_y, sdo_x, sdo_c, offs_c, D, DOT, PRECISION, ACC)
            q = tl.load(_tile_ptrs(Qb, roq, coq, offs_d, sq_y, sq_x, sq_c), mask=mask_q, other=0.0).to(DOT)
            do = tl.load(_tile_ptrs(DOb, roq, coq, offs_d, sdo_y, sdo_x, sdo_c), mask=mask_q, other=0.0).to(DOT)
            pos = roq.to(tl.int64) * W + coq
            # query rows past N get LSE = +inf, hence P = 0: they add nothing
            lse = tl.load(stats + pos, mask=offs_m < N, other=float("inf"))
            if BLOCK_DC == 0:  # dO is in registers already (in its own dtype, or widened exactly)
                o = tl.load(_tile_ptrs(Ob, roq, coq, offs_d, so_y, so_x, so_c), mask=mask_q, other=0.0)
                delta = tl.sum(o.to(ACC) * do.to(ACC), 1)
            else:
                delta = _delta_rows(Ob, DOb, roq, coq, offs_m < N, so_y, so_x, so_c, sdo_y, sdo_x, sdo_c, D,
                                    ACC, BLOCK_D, BLOCK_DC)
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
            if WITH_DQ and NEED_QKV:  # every key of the window is in this block: dQ of the query block, whole
                # key rows past N hold K = 0: they add nothing
                dq = tl.dot(tl.trans(ds_t.to(K.dtype.element_ty).to(DOT)), k, input_precision=PRECISION,
                            out_dtype=ACC) * scale
                tl.store(_tile_ptrs(DQ + b * sdq_b + h * D * sdq_c, roq, coq, offs_d, sdq_y, sdq_x, sdq_c),
                         dq.to(DQ.dtype.element_ty), mask=mask_q)
            if DBIAS != 0:  # fast: the pair's slot; deterministic: this program's own rows of its split's slot
                tl.atomic_add(slot + offs_m[None, :], ds_t, mask=valid)
        if NEED_QKV:
            dk = dk * scale
            tl.store(_tile_ptrs(DK + b * sdk_b + h * D * sdk_c, rok, cok, offs_d, sdk_y, sdk_x, sdk_c),
                     dk.to(DK.dtype.element_ty), mask=mask_k)
            tl.store(_tile_ptrs(DV + b * sdv_b + h * D * sdv_c, rok, cok, offs_d, sdv_y, sdv_x, sdv_c),
                     dv.to(DV.dtype.element_ty), mask=mask_k)
        if DBIAS == 2:  # this pair's adds are performed before the next pair's: each sum runs in pair order
            tl.debug_barrier()


@triton.jit
def _win_scores_grad(
    Q, K, V, DO, LSE, TABLE, MASK,
    sq_y, sq_x, sq_c, sk_y, sk_x, sk_c, sv_y, sv_x, sv_c, sdo_y, sdo_x, sdo_c,
    st_r, st_h, sm_w, sm_i, sm_j,
    wid, mwid, h, offs_m, offs_n, offs_d, delta, H, W, D, NWC, SH, SW, qk_scale, log2e,  # mwid: the mask's window
    WH: tl.constexpr, WW: tl.constexpr, SHIFTED: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_MODE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr, BLOCK_DC: tl.constexpr,
):
    """dS = P ∘ (dO Vᵀ − Δ) of a (query block, key block) tile of one window and head, with the key
    tile K (to form dQ = dS K). Q, K, V, DO, LSE point at this batch element (and head); ``delta``:
    Δ of the query block. BLOCK_DC > 0: S and dP over head-dim chunks of that width."""
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
    Q, K, V, O, DO, DQ,  # (B, H, W, C) token maps, any strides
    LSE, TABLE, MASK,
    sq_b, sq_y, sq_x, sq_c, sk_b, sk_y, sk_x, sk_c, sv_b, sv_y, sv_x, sv_c, so_b, so_y, so_x, so_c,
    sdo_b, sdo_y, sdo_x, sdo_c, sdq_b, sdq_y, sdq_x, sdq_c,
    st_r, st_h, sm_w, sm_i, sm_j, NMW,
    H, W, D, NH, NWC, NQB,
    SH, SW, scale: tl.float64, qk_scale: tl.float64, log2e: tl.float64,  # shift; scalars as in the forward
    WH: tl.constexpr, WW: tl.constexpr, SHIFTED: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_MODE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DC: tl.constexpr = 0,  # as in the dK/dV kernel
):
    """dQ of a query block of a window (windows wider than one dK/dV key block); Δ formed here."""
    N: tl.constexpr = WH * WW
    if ACC != tl.float64:  # fp32 kernels convert the fp64 scalars once; float64 ones keep every bit
        scale, qk_scale, log2e = tl.cast(scale, ACC), tl.cast(qk_scale, ACC), tl.cast(log2e, ACC)
    wid, h, b, offs_m, mwid = _window_program(NQB, BLOCK_M, H, NWC, NMW, WH, MASK_MODE)
    offs_d = tl.arange(0, BLOCK_D)
    _, _, _, _, roq, coq = _window_tokens(wid, offs_m, NWC, WH, WW, SH, SW, H, W, SHIFTED)
    DO += b * sdo_b + h * D * sdo_c
    delta = _delta_rows(O + b * so_b + h * D * so_c, DO, roq, coq, offs_m < N, so_y, so_x, so_c, sdo_y, sdo_x,
                        sdo_c, D, ACC, BLOCK_D, BLOCK_DC)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, N, BLOCK_N):
        ds, k = _win_scores_grad(
            Q + b * sq_b + h * D * sq_c, K + b * sk_b + h * D * sk_c, V + b * sv_b + h * D * sv_c,
            DO, LSE + (b * NH + h) * H * W, TABLE, MASK,
            sq_y, sq_x, sq_c, sk_y, sk_x, sk_c, sv_y, sv_x, sv_c, sdo_y, sdo_x, sdo_c, st_r, st_h, sm_w, sm_i, sm_j,
            wid, mwid, h, offs_m, start_n + tl.arange(0, BLOCK_N), offs_d, delta, H, W, D, NWC, SH, SW, qk_scale,
            log2e, WH, WW, SHIFTED, HAS_BIAS, MASK_MODE, ACC, PRECISION, DOT, BLOCK_DC,
        )
        dq += tl.dot(ds.to(K.dtype.element_ty).to(DOT), k, input_precision=PRECISION, out_dtype=ACC)
    dq = dq * scale
    tl.store(_tile_ptrs(DQ + b * sdq_b + h * D * sdq_c, roq, coq, offs_d, sdq_y, sdq_x, sdq_c),
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < N) & (offs_d[None, :] < D))


@triton.jit
def _win_dbias_reduce_kernel(
    PART,  # (S, NH, N·N) contiguous, ACC: the dK/dV kernel's sums of dS per slot, flat index j·N + i
    PAIRS,  # (R, N) int64 contiguous: flat j·N + i of the (query i, key j) pairs of offset r, padded with N·N
    DTABLE,  # (R, NH) contiguous, the table's dtype: the table's gradient
    S, NH,  # slots, heads
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


# (kernel, padded head dim class, dtype class) -> (BLOCK_M, BLOCK_N, num_warps, num_stages[, BLOCK_DC[, DQ]])
# on a GPU; BLOCK_DC (backward kernels): S and dP summed over head-dim chunks of that width; DQ (dK/dV):
# 1 = where one key block covers the window, the dK/dV program also writes dQ (no dQ launch).
#   kernel: "fwd", "dkdv" (a program per BLOCK_N keys of a window, looping over BLOCK_M queries; it
#     also forms Δ and sums dS for the table), "dkdv1" (the dK/dV entry for windows of ≤ 64 tokens
#     where one exists), "dq" (a program per BLOCK_M queries, looping over BLOCK_N keys);
#   head dim class: "d32" (BLOCK_D ≤ 32: SwinIR-light's 10, SwinIR's and HAT's 30), "d64", "d256";
#     fp32 has "d16" entries of its own for BLOCK_D = 16;
#   dtype class: "16bit", "fp32" (3×TF32 by default: more registers than one tf32 product), "fp64".
# Chosen by compiling for sm_90 (compile_report.run_case, a shifted window of 8 and of 16 with the
# bias table, head dims 10, 30, 64, 128, both backward modes) under triton 3.9 and 3.6: the first
# setting tried with no spills and, for 16-bit and fp32, every dot on wgmma. Registers: 3.9 / 3.6.
_WIN_LAUNCH = {
    # 16-bit: fwd and dq 64×64/8/2: no spills, all HGMMA, D = 10, 30, 64 (64×64/4/2 spilled 40-72 B)
    **{(k, d, "16bit"): (64, 64, 8, 2) for k in ("fwd", "dq") for d in ("d32", "d64")},
    # dK/dV at windows of 16 (and D = 64 at 8): 32×64/8/1, 173-246 / 175-246 registers (32×64/8/2
    # spilled 16 B in deterministic mode at D = 30 under 3.6); dQ its own launch
    **{("dkdv", d, "16bit"): (32, 64, 8, 1, 0, 0) for d in ("d32", "d64")},
    # windows of ≤ 64 tokens, D ≤ 32: one program per 8×8 window does dK, dV, dQ and dS (64×64/8/2,
    # 240-254 / 243-254 registers, 16-20 HGMMA); at D = 64 the same spilled 160 B (deterministic)
    ("dkdv1", "d32", "16bit"): (64, 64, 8, 2, 0, 1),
    # fp32 (3×TF32), D ≤ 32: fwd and dq 64×32/8/2 no spills, HGMMA; dkdv 32×64/8/1, 242-254 /
    # 249-255 registers, no spills in either mode (s2 spilled 80-160 B; with 16-wide chunks 72-152
    # B). dQ in the dK/dV pass does not fit: on wgmma it needs 64 queries a block, and 64×64
    # spilled 648-888 B (32 queries: mma.sync)
    ("fwd", "d32", "fp32"): (64, 32, 8, 2),
    # dkdv (Δ, dS sums and a given mask's loads in the loop) over 16-wide head-dim chunks,
    # 16×64/4/1: 216-247 registers, no spills at windows 8, 16 and with a given mask (16p), both
    # modes, triton 3.9 and 3.6; held whole, 32×64/8/1 spilled 200 B with a given mask
    ("dkdv", "d32", "fp32"): (16, 64, 4, 1, 16, 0),
    ("dq", "d32", "fp32"): (64, 32, 8, 2),
    # fp32, BLOCK_D = 16 (SwinIR-light's D = 10): as "d32" with 4 warps. With 8 the two warp groups
    # split the 16-wide head dim into tf32 wgmma with N = 8, which read past their shared memory
    # (triton-lang/triton#10629; the same split in the fp32 attention dK/dV kernel gave an illegal
    # memory access on an H200). dkdv 32×64/4/1: 227-240 / 217-240 registers (s2 spilled 24-88 B)
    ("fwd", "d16", "fp32"): (64, 32, 4, 2),
    ("dkdv", "d16", "fp32"): (32, 64, 4, 1, 0, 0),
    ("dq", "d16", "fp32"): (64, 32, 4, 2),
    # fp32, D = 64: fwd 64×32/8/2 no spills, 68 HGMMA. The backward on wgmma with S and dP over
    # 16-wide head-dim chunks (the 5th element: BLOCK_DC): dq 64×32/8/2; dkdv 16×64/4/1, 244-255
    # registers, no spills (the fast mode's slot address is formed once per pair: formed per block
    # it spilled 8 B at window 16 under 3.9; 16×64/4/2 spilled 56-160 B in both versions)
    ("fwd", "d64", "fp32"): (64, 32, 8, 2),
    ("dkdv", "d64", "fp32"): (16, 64, 4, 1, 16, 0),
    ("dq", "d64", "fp32"): (64, 32, 8, 2, 16),
    # fp64 (FMA units): 16×32/4/1 no spills (32×32/4/1 spills 88-104 B); dkdv 16×16/8/1: 174-186 /
    # 213-254 registers (16×16/4/1 spilled 8-72 B)
    **{(k, d, "fp64"): (16, 32, 4, 1) for k in ("fwd", "dq") for d in ("d32", "d64")},
    **{("dkdv", d, "fp64"): (16, 16, 8, 1) for d in ("d32", "d64")},
    # D = 128 and 256: the small-tile rule; at D = 128 16-bit is clean with it, fp32 and fp64 sum S
    # and dP over 16-wide chunks (16×16/4/1 whole spilled 8-40 B in fp32, 384 B in fp64's dK/dV):
    # fp32 clean; fp64 dkdv over 32-wide chunks (16-wide: 8 B at window 16 in the fast mode under
    # 3.6; 4 warps 8-104 B), 255 registers, no spills in either mode or version
    **{(k, "d256", c): (16, 16, 4, 1) for k in ("fwd", "dkdv", "dq") for c in ("16bit", "fp32", "fp64")},
    ("dkdv", "d256", "fp32"): (16, 16, 8, 1, 16),
    ("dkdv", "d256", "fp64"): (16, 16, 8, 1, 32),
    **{("dq", "d256", c): (16, 16, 4, 1, 16) for c in ("fp32", "fp64")},
}


_LAUNCH_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "BLOCK_DC", "DQ")
_KERNELS = ("fwd", "dkdv", "dq")
_OVERRIDES = {}  # kernel -> launch settings replacing its table entry (set by _launch_override only)


def _check_launch(kernel: str, cfg: dict) -> None:
    check_launch_settings("window _launch_override", kernel, cfg, _KERNELS, _LAUNCH_KEYS)


@contextlib.contextmanager
def _launch_override(kernel: str, **cfg):
    """Inside the ``with`` block, launch ``kernel`` ("fwd", "dkdv" or "dq") with ``cfg`` in
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
        name = "dkdv1" if kernel == "dkdv" and 0 < tokens <= 64 and ("dkdv1", d, c) in _WIN_LAUNCH else kernel
        bm, bn, warps, stages, *more = _WIN_LAUNCH[(name, d, c)]
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        if more and more[0]:  # S and dP over head-dim chunks (the backward kernels)
            cfg["BLOCK_DC"] = more[0]
        if len(more) > 1:
            cfg["DQ"] = more[1]
    cfg.update(_OVERRIDES.get(kernel, {}))
    blocks = dict(BLOCK_M=cfg.pop("BLOCK_M"), BLOCK_N=cfg.pop("BLOCK_N"), BLOCK_D=block_d)
    chunk = cfg.pop("BLOCK_DC", 0)
    if chunk and kernel != "fwd":
        blocks["BLOCK_DC"] = min(chunk, block_d)
    fuse = cfg.pop("DQ", 1)
    if kernel == "dkdv":  # not a kernel argument: the launcher takes it out
        blocks["DQ"] = fuse
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
    """(R, wh·ww) flat indices j·N + i of the (query i, key j) pairs of each relative offset r of the
    bias table, padded with N·N (past the end): dtable[r] = Σ over row r of dSᵀ's gathered pairs."""
    n = wh * ww
    t = torch.arange(n)
    y, x = t // ww, t % ww
    idx = ((y[:, None] - y[None, :] + wh - 1) * (2 * ww - 1) + (x[:, None] - x[None, :] + ww - 1)).flatten()
    order = torch.argsort(idx, stable=True)
    counts = torch.bincount(idx, minlength=(2 * wh - 1) * (2 * ww - 1))
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n * n) - starts[idx[order]]
    pairs = torch.full((counts.numel(), n), n * n, dtype=torch.int64)
    pairs[idx[order], slot] = (order % n) * n + order // n  # query i, key j -> the dK/dV kernel's j·N + i
    return pairs.to(device)


PART_BYTES = 4 << 20  # the most the fast path's atomic slots of dS take


@functools.lru_cache(maxsize=256)
def _dbias_slots(n: int, heads: int, pairs: int, key_blocks: int, deterministic: bool, interpreted: bool) -> int:
    """How many (heads, N, N) slots of summed dS the table's gradient goes through. Deterministic:
    splits of the (batch, window) pairs, each program of the dK/dV launch owning its rows of its
    split's slot: about two waves of a 132-SM GPU (two splits under the interpreter), never more
    than there are pairs. Fast: one program per pair, atomics into pair mod slots; slots as many as
    PART_BYTES allow, to spread the pairs that add into one address."""
    if deterministic:
        if interpreted:
            return min(2, pairs)
        return max(1, min(pairs, -(-264 // (key_blocks * heads))))
    return max(1, min(pairs, PART_BYTES // (4 * heads * n * n)))


def window_backward(do, q, k, v, out, lse, geo: _Geometry, scale: float, need_qkv: bool, need_table: bool,
                    grads=None, plans=None):
    """Launch the backward kernels. ``do`` may have any strides (stride 0 included).

    Returns (dq, dk, dv, dtable); what is not needed comes back as an empty (0,) tensor. ``grads``:
    (dq, dk, dv) to write into (views of one buffer laid out like the fused qkv projection, say)
    instead of fresh tensors. ``plans``: as in ``window_forward``. With
    ``torch.are_deterministic_algorithms_enabled()``, the table's gradient is summed in a fixed
    order (two runs give bitwise-equal gradients); else with fp32 atomics (dQ, dK, dV are
    deterministic in both).
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
    total = geo.batch * geo.nwin
    deterministic = need_table and torch.are_deterministic_algorithms_enabled()
    slots = 1
    part = pairs = q  # any pointer: unused without the table
    if need_table:
        dtable = poison(torch.empty(geo.table.shape, dtype=geo.table.dtype, device=q.device))
        nkb = triton.cdiv(geo.n, _config("dkdv", geo.head_dim, q.dtype, geo.n, q.device)[0]["BLOCK_N"]) \
            if deterministic else 1
        slots = _dbias_slots(geo.n, geo.heads, total, nkb, deterministic, interpreting())
        shape = (slots, geo.heads, geo.n, geo.n)
        part = torch.zeros(shape, dtype=stat_dtype(q.dtype), device=q.device)
        pairs = _offset_pairs(geo.wh, geo.ww, q.device)

    def launch():
        constexprs = geo.constexprs(q.dtype)
        blocks, settings = _config("dkdv", geo.head_dim, q.dtype, geo.n, q.device)
        nkb = triton.cdiv(geo.n, blocks["BLOCK_N"])
        splits = slots if deterministic else total
        fuse = bool(blocks.pop("DQ"))
        with_dq = need_qkv and nkb == 1 and fuse
        dbias = 0 if not need_table else 2 if deterministic else 1
        strides_in = (*q.stride(), *k.stride(), *v.stride(), *out.stride(), *do.stride())
        sizes = (geo.height, geo.width, geo.head_dim, geo.heads, geo.nwc)
        _win_bwd_dkdv_kernel[(splits * nkb, geo.heads)](
            q, k, v, out, do, dq, dk, dv, lse, *geo.extras(), part,
            *strides_in, *((*dq.stride(), *dk.stride(), *dv.stride()) if need_qkv else (0,) * 12), *geo.extra_strides(),
            *sizes, nkb, geo.nwin, total, slots, geo.sh, geo.sw, scale, scale * LOG2E, LOG2E,
            **constexprs, **blocks, **settings, NEED_QKV=need_qkv, WITH_DQ=with_dq, DBIAS=dbias,
        )
        if need_qkv and not with_dq:
            dq_blocks, dq_settings = _config("dq", geo.head_dim, q.dtype, geo.n, q.device)
            nqb = triton.cdiv(geo.n, dq_blocks["BLOCK_M"])
            _win_bwd_dq_kernel[(geo.nwin * nqb, geo.heads, geo.batch)](
                q, k, v, out, do, dq, lse, *geo.extras(),
                *strides_in, *dq.stride(), *geo.extra_strides(),
                *sizes, nqb, geo.sh, geo.sw, scale, scale * LOG2E, LOG2E, **constexprs, **dq_blocks, **dq_settings,
            )
        if need_table:
            _win_dbias_reduce_kernel[(pairs.shape[0],)](  # fixed-order sums over the slots and each offset's pairs
                part, pairs, dtable, slots, geo.heads, N=geo.n, ACC=constexprs["ACC"],
                BLOCK_P=next_pow2(geo.n), BLOCK_H=next_pow2(geo.heads),
            )

    # the batch (see window_forward) and the saved q, k, v and out's strides (a saved-tensor hook may
    # hand them back with others than the call's signature says) are in the key
    key = (_call_key(geo, q, k, v, scale) if plans is None else ("bwd", dot_precision(q.dtype), geo.batch,
                                                                q.stride(), k.stride(), v.stride(),
                                                                geo.table_strides, geo.mask_strides),
           out.stride(), do.stride(), dq.stride(), dk.stride(), dv.stride(), need_qkv, need_table, deterministic)
    # dq, dk, dv may be views of the caller's buffer: their alignment is looked at too
    tensors = (do, q, k, v, out, dq, dk, dv, *geo.extras(), lse, dtable, part, pairs)
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

