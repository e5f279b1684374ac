"""Channel attention gate (SE / RCAN; CBAM's channel half), fused forward and backward.

Maths. For x: (B, C, H, W), with p = h·W + w the flat pixel index and HW = H·W:
    avg[b, c] = Σ_p x[b, c, p] / HW,   max[b, c] = x[b, c, carg[b, c]]  (carg: first arg-max pixel)
    mlp(s)    = w2 · relu(w1 · s + b1) + b2          w1: (C/r, C), w2: (C, C/r), biases optional
    z         = mlp(avg)                  (pool="avg")
              = mlp(avg) + mlp(max)       (pool="avgmax", CBAM's shared MLP)
    ca        = sigmoid(z),   y = x · ca[b, c]
Backward, with dy the upstream gradient:
    dca[b, c] = Σ_p dy · x,   dz = dca · ca · (1 − ca)
    back through the MLP (each branch): dw1, db1, dw2, db2 and ds_avg, ds_max
    dx = dy · ca[b, c] + ds_avg[b, c] / HW + [p = carg[b, c]] · ds_max[b, c]
The max-pool gradient goes to exactly one pixel per (b, c): the first (lowest h·W + w) attaining
the maximum, deterministically. NaN counts as the maximum (the first NaN), as in torch.max.

Passes over x-sized tensors (each read or write of a (B, C, H, W) map counts one):
    forward   2 reads, 1 write: (1) x → per-(b, c) sum, max and arg-max;  (2) x → y = x · ca
    backward  3 reads, 1 write: (1) dy, x → Σ_p dy·x per (b, c);  (2) dy → dx
    saved for backward: x and per-(b, c) statistics only: ca, avg, max (fp32) and carg (int32).
Eager PyTorch's forward also reads x twice and writes y once for pool="avg" (three reads for
"avgmax"); its backward materialises dy·x and a pooling-gradient map besides dx and sums them.

Launches: forward 2 (statistics, output), backward 3 (dot, the MLP's backward, dx), no PyTorch op
(tests/test_gating_launches.py counts them). Reductions over pixels are split into chunks per
program for parallelism; the last program of each batch element to finish (``_last_program``: an
int32 arrival counter) merges the per-chunk partials (B, C, chunks) in chunk order and runs the MLP
(a few C×C/r multiply-adds per batch element) and the sigmoid as the pass's epilogue. Between the
backward's dot and dx passes one small launch (a program per batch element) merges dca, runs the
sigmoid's and both MLP branches' backward (pre-activations recomputed from avg and max) and writes
gpool for the dx pass; its last program sums the weight gradients over the batch in order. (As the
dot pass's epilogue, that code made triton 3.6 spill a pointer of the dot loop.) No float atomics:
results are bitwise reproducible.

Registration. Two torch.library custom ops, each with a fake (meta) kernel so that
torch.compile(fullgraph=True) traces them: ``attnsr::channel_gate`` (forward passes 1 and 2 and
the MLP; returns y and the statistics above) and ``attnsr::channel_gate_backward`` (backward passes
1 and 2, the MLP's backward and its weight gradients when ``need_w``), which the forward op's
registered autograd formula calls (gradients of the statistics outputs are not materialised). Under
torch.autocast, the floating-point inputs (float64 excepted) are cast to the autocast dtype, by the
public function and by the op's autocast rule (``_runtime.autocast_inputs``, the rule of every
attnsr op and backend); the kernels compute the statistics and the MLP in fp32 whatever the dtype.
In eager mode the public function calls the op bodies from a plain autograd.Function instead
(``_gating.call_gate``: the custom ops' dispatch costs more host time than the launches) and skips
the checks for a call signature seen before (``_gating.repeat_call``).
Reverse mode only: forward-mode AD and double backward raise.

Limits and precision. x: (B, C, H, W) with any strides (NCHW, channels_last, views); y and dx are
channels_last when x has channels innermost, else contiguous. B ≤ 65535, H·W ≤ 2^31 − 2^16 (int32 pixel
indices; every loop bound stays below 2^31, tests/test_index_bounds.py). Statistics,
the MLP and the gate are fp32 for fp16 / bf16 / fp32 inputs and float64 for float64 inputs; y is
rounded once to x's dtype. Weight gradients are returned in the weights' dtype.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ._gating import (
    _block_max,
    _chunk_end,
    _last_program,
    _merge_max,
    _through_spatial_gate,
    _tile_offsets,
    EagerOp,
    call_gate,
    check_map_limits,
    counters,
    empty_map_like,
    gate_apply,
    gate_dx,
    PixelRun,
    prepare_inputs,
    repeat_call,
    tile_config,
)
from ._runtime import (
    absent_output,
    acc_dtype,
    check_rank,
    check_runnable,
    check_same,
    check_tensor,
    interpreting,
    next_pow2,
    on_tensor_device,
    refuse_double_backward,
    register_autocast,
    stat_dtype,
    ValidCalls,
)

POOLS = ("avg", "avgmax")


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mlp_weights_tile(W1, sw1_j, sw1_c, j, j_in, c, c_in, ACC: tl.constexpr):
    """[len(j), len(c)] tile w1[j, c] (hidden units j × channels c), zero outside, in ACC."""
    return tl.load(W1 + j[:, None] * sw1_j + c[None, :] * sw1_c, mask=j_in[:, None] & c_in[None, :],
                   other=0.0).to(ACC)


@triton.jit
def _channel_mlp_forward(
    b, SUM, MAX, ARG, AVG, MX, CARG, CA, W1, B1, W2, B2, sw1_j, sw1_c, sw2_c, sw2_j, sb1, sb2,
    C, HW, NCH, HID,
    WITH_MAX: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, HP: tl.constexpr,
):
    """Epilogue of the statistics pass for batch element b, run by its last program: merge the
    chunks' partials (sums in chunk order; the first chunk attaining the max), store avg, max,
    carg, then the MLP of both branches and the sigmoid: ca (all (B, C) ACC / int32)."""
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
    h_avg = tl.where(h_avg < 0, 0.0, h_avg)  # relu that keeps NaN, as torch.relu
    h_max = tl.where(h_max < 0, 0.0, h_max)
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
    C, HW, W,  # channels, pixels per map, map width
    CHUNK,  # pixels per program (a multiple of BLOCK_P)
    NCH,  # number of chunks = cdiv(HW, CHUNK)
    HID,  # hidden units of the MLP
    WITH_MAX: tl.constexpr,  # also compute max and arg-max (pool="avgmax")
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    ACC: tl.constexpr,  # accumulator dtype: fp32 (fp64 for fp64 inputs)
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, HP: tl.constexpr,  # epilogue tiles: channels, chunks, hidden
):
    chunk = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    c_in = c < C
    X += b * sx_b
    acc = tl.zeros([BLOCK_C], dtype=ACC)
    run_max = tl.full([BLOCK_C], float("-inf"), dtype=ACC)
    run_arg = tl.zeros([BLOCK_C], dtype=tl.int32) + HW  # HW = none yet
    start = chunk * CHUNK
    for p0 in range(start, _chunk_end(start, CHUNK, HW), BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = c_in[:, None] & (p < HW)[None, :]
        x = tl.load(X + _tile_offsets(c, p, W, sx_c, sx_h, sx_w), mask=mask, other=0.0).to(ACC)
        acc += tl.sum(x, 1)
        if WITH_MAX:
            blk_max, blk_arg = _block_max(tl.where(mask, x, float("-inf")), p[None, :], HW, 1)
            run_max, run_arg = _merge_max(run_max, run_arg, blk_max, blk_arg, HW)
    out = (b * C + c) * NCH + chunk
    tl.store(SUM + out, acc, mask=c_in)
    if WITH_MAX:
        tl.store(MAX + out, run_max, mask=c_in)
        tl.store(ARG + out, run_arg, mask=c_in)
    if _last_program(COUNT, b, tl.num_programs(0) * tl.num_programs(1)):
        _channel_mlp_forward(b, SUM, MAX, ARG, AVG, MX, CARG, CA, W1, B1, W2, B2, sw1_j, sw1_c, sw2_c, sw2_j,
                             sb1, sb2, C, HW, NCH, HID, WITH_MAX, HAS_B1, HAS_B2, ACC, BLOCK_K, BLOCK_N, HP)


@triton.jit
def _channel_mlp_backward(
    b, DOT, CA, AVG, MX, W1, B1, W2, sw1_j, sw1_c, sw2_c, sw2_j, sb1, GPOOL, DZ, DPRE, HACT,
    C, HW, NCH, HID,
    WITH_MAX: tl.constexpr, HAS_B1: tl.constexpr, ACC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, HP: tl.constexpr,
):
    """Batch element b of the MLP's backward (``_channel_mlp_backward_kernel``): merge
    dca = Σ_p g1·x from the chunks, dz = dca · ca · (1 − ca), back through both MLP branches
    (pre-activations recomputed from avg and max): gpool (B, 2, C), and for the weight-gradient
    kernel dz (B, C), dpre and relu(pre) (B, 2, HID) of each branch."""
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
    d_avg = tl.where(pre_avg > 0, t, 0.0)
    d_max = tl.where(pre_max > 0, t, 0.0)
    tl.store(DPRE + (2 * b) * HID + j, d_avg, mask=j_in)
    tl.store(HACT + (2 * b) * HID + j, tl.where(pre_avg < 0, 0.0, pre_avg), mask=j_in)
    if WITH_MAX:
        tl.store(DPRE + (2 * b + 1) * HID + j, d_max, mask=j_in)
        tl.store(HACT + (2 * b + 1) * HID + j, tl.where(pre_max < 0, 0.0, pre_max), mask=j_in)
    for c0 in range(0, C, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        c_in = c < C
        w1 = _mlp_weights_tile(W1, sw1_j, sw1_c, j, j_in, c, c_in, ACC)
        tl.store(GPOOL + (2 * b) * C + c, tl.sum(w1 * d_avg[:, None], 0) / HW, mask=c_in)
        if WITH_MAX:
            tl.store(GPOOL + (2 * b + 1) * C + c, tl.sum(w1 * d_max[:, None], 0), mask=c_in)


@triton.jit
def _channel_dot_kernel(
    DY, X,  # upstream gradient (any strides, stride 0 included) and input map (B, C, H, W)
    OUT,  # (B, C, NCH) contiguous ACC: partial Σ_p g1 · x over each chunk of pixels
    S,  # (B, H·W) ACC: spatial gate (SPATIAL)
    DPOOL,  # (B, 2, H·W) ACC: gradient per element through the channel mean (÷ C) and max (SPATIAL)
    SARG,  # (B, H·W) int32: arg-max channel of each pixel (SPATIAL)
    sdy_b, sdy_c, sdy_h, sdy_w,  # dy strides (elements)
    sx_b, sx_c, sx_h, sx_w,  # x strides
    C, HW, W,  # channels, pixels per map, map width
    CHUNK, NCH,  # pixels per program, number of chunks
    SPATIAL: tl.constexpr,  # g1 = dy (channel_gate) or the gradient at x·ca inside cbam_gate
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    chunk = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    c_in = c < C
    DY += b * sdy_b
    X += b * sx_b
    acc = tl.zeros([BLOCK_C], dtype=ACC)
    start = chunk * CHUNK
    for p0 in range(start, _chunk_end(start, CHUNK, HW), BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_in = p < HW
        mask = c_in[:, None] & p_in[None, :]
        g = tl.load(DY + _tile_offsets(c, p, W, sdy_c, sdy_h, sdy_w), mask=mask, other=0.0).to(ACC)
        if SPATIAL:
            g = _through_spatial_gate(g, c, p, p_in, b, HW, S, DPOOL, SARG)
        x = tl.load(X + _tile_offsets(c, p, W, sx_c, sx_h, sx_w), mask=mask, other=0.0).to(ACC)
        acc += tl.sum(g * x, 1)
    tl.store(OUT + (b * C + c) * NCH + chunk, acc, mask=c_in)


@triton.jit
def _mlp_weight_grads(
    c0, DZ, DPRE, HACT, AVG, MX, DW1, DB1, DW2, DB2, B, C, HID,
    WITH_MAX: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, HP: tl.constexpr,
):
    """Weight gradients of channels [c0, c0 + BLOCK_K), summed over the batch in order:
    dw2[c, j] = Σ_b dz·(relu(pre_avg) + relu(pre_max))[j], dw1[j, c] = Σ_b Σ_branch dpre[j]·s[c],
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
    DOT,  # (B, C, NCH) contiguous ACC: the dot pass's partial Σ_p g1 · x per chunk
    CA, AVG, MX,  # (B, C) ACC: the forward's gate and pooled statistics (MX: WITH_MAX)
    W1, B1, W2,  # MLP weights (their own dtype and strides) and their strides (elements)
    sw1_j, sw1_c, sw2_c, sw2_j, sb1,
    GPOOL,  # (B, 2, C) ACC, out: gradient per element through the pixel mean (÷ H·W) and max
    DZ,  # (B, C) ACC, out: gradient of the pre-sigmoid z
    DPRE, HACT,  # (B, 2, HID) ACC, out: gradient of each branch's pre-activation, and relu(pre)
    DW1, DB1, DW2, DB2,  # out (NEED_W), contiguous, the weights' dtypes: (HID, C), (HID,), (C, HID), (C,)
    COUNT,  # int32 counters, zero (``_last_program``: the last program sums the weight gradients)
    C, HW, NCH, HID,  # channels, pixels per map, chunks of the dot pass, hidden units
    NEED_W: tl.constexpr, WITH_MAX: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, HP: tl.constexpr,  # tiles: channels, chunks, hidden
):
    """The sigmoid's and the MLP's backward between the dot and dx passes: program b does batch
    element b (``_channel_mlp_backward``); the last to finish sums the weight gradients over the
    batch (``_mlp_weight_grads``), a few B·C·C/r multiply-adds."""
    b = tl.program_id(0).to(tl.int64)
    _channel_mlp_backward(b, DOT, CA, AVG, MX, W1, B1, W2, sw1_j, sw1_c, sw2_c, sw2_j, sb1, GPOOL, DZ, DPRE, HACT,
                          C, HW, NCH, HID, WITH_MAX, HAS_B1, ACC, BLOCK_K, BLOCK_N, HP)
    if NEED_W:
        if _last_program(COUNT, 0, tl.num_programs(0)):
            for c0 in range(0, C, BLOCK_K):
                _mlp_weight_grads(c0, DZ, DPRE, HACT, AVG, MX, DW1, DB1, DW2, DB2, tl.num_programs(0), C, HID,
                                  WITH_MAX, HAS_B1, HAS_B2, ACC, BLOCK_K, HP)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _chunking(x: torch.Tensor, block_c: int, block_p: int):
    """(CHUNK, NCH): pixels per program and number of chunks of a reduction over pixels.

    On a GPU, enough chunks that B · C-blocks · chunks ≈ 1024 programs; in the interpreter two
    tiles per chunk, so that small test maps already take the multi-chunk path.
    """
    batch, channels = x.shape[:2]
    hw = x.shape[2] * x.shape[3]
    if interpreting():
        chunk = 2 * block_p
    else:
        programs = batch * triton.cdiv(channels, block_c)
        wanted = max(1, triton.cdiv(1024, max(1, programs)))
        chunk = max(4 * block_p, triton.cdiv(triton.cdiv(hw, wanted), block_p) * block_p)
    return chunk, triton.cdiv(hw, chunk)


def _epilogue_tiles(hidden: int, nch: int) -> dict:
    """Tiles of the MLP's forward and backward: the hidden units whole (HP), channels in blocks of
    BLOCK_K so that a [HP, BLOCK_K] weight tile holds about 2048 values, chunks in blocks of BLOCK_N
    ≤ 8. The [BLOCK_K, BLOCK_N] tile of chunk partials then holds at most 512 values (4 masked
    loads per thread): at 64 × 16 the backward spilled a predicate register (8 B of stack, sm_90,
    triton 3.9, CBAM's 4×128×256² map in channels_last bf16, 16 chunks)."""
    hp = next_pow2(hidden)
    return dict(BLOCK_K=max(1, min(64, 2048 // hp)), BLOCK_N=min(next_pow2(nch), 8), HP=hp)


def _weights(w1, b1, w2, b2):
    """Pointer and stride arguments of the MLP weights (an absent bias: w1 in its place, stride 0)."""
    return (w1, w1 if b1 is None else b1, w2, w2 if b2 is None else b2, *w1.stride(), *w2.stride(),
            0 if b1 is None else b1.stride(0), 0 if b2 is None else b2.stride(0))


class ChannelState:
    """What the channel gate keeps for backward: the gate ca and the pooled statistics, all (B, C).

    mx and arg are None for pool="avg". ``outputs`` / ``from_outputs`` convert to and from the
    four tensors a custom op returns and takes (empty (0,) tensors stand for None).
    """

    def __init__(self, ca, avg, mx, arg):
        self.ca, self.avg, self.mx, self.arg = ca, avg, mx, arg

    def outputs(self):
        absent = absent_output(self.ca)
        return (self.ca, self.avg, absent if self.mx is None else self.mx,
                absent_output(self.ca, torch.int32) if self.arg is None else self.arg)

    @staticmethod
    def from_outputs(ca, avg, mx, arg, pool: str) -> "ChannelState":
        return ChannelState(ca, avg, mx, arg) if pool == "avgmax" else ChannelState(ca, avg, None, None)

    @staticmethod
    def fake_outputs(x: torch.Tensor, pool: str):
        """Empty tensors shaped as ``outputs()`` of the state of x: the fake (meta) kernels' answer."""
        sd = stat_dtype(x.dtype)
        bc = tuple(x.shape[:2])
        mx_shape = bc if pool == "avgmax" else (0,)
        return (x.new_empty(bc, dtype=sd), x.new_empty(bc, dtype=sd),
                x.new_empty(mx_shape, dtype=sd), x.new_empty(mx_shape, dtype=torch.int32))


def channel_gate_state(x, w1, b1, w2, b2, pool: str) -> ChannelState:
    """Pass 1 over x: the pooled statistics, then (the last program of each batch element) the MLP
    and the sigmoid: the gate ca (B, C). One launch."""
    batch, channels, height, width = x.shape
    hw = height * width
    with_max = pool == "avgmax"
    block_c, block_p, launch = tile_config(x)
    chunk, nch = _chunking(x, block_c, block_p)
    sd = stat_dtype(x.dtype)
    sums = torch.empty((batch, channels, nch), dtype=sd, device=x.device)
    maxes = torch.empty_like(sums) if with_max else sums
    args = torch.empty((batch, channels, nch), dtype=torch.int32, device=x.device) if with_max else sums
    ca = torch.empty((batch, channels), dtype=sd, device=x.device)
    avg = torch.empty_like(ca)
    mx = torch.empty_like(ca) if with_max else None
    carg = torch.empty((batch, channels), dtype=torch.int32, device=x.device) if with_max else None
    if batch > 0:
        grid = (nch, triton.cdiv(channels, block_c), batch)
        run = PixelRun(width, x)
        _channel_stats_kernel[grid](
            x, sums, maxes, args, avg, ca if mx is None else mx, ca if carg is None else carg, ca,
            *_weights(w1, b1, w2, b2), counters(x.device), *run.strides(x), channels, hw, run.width, chunk, nch,
            w1.shape[0], WITH_MAX=with_max, HAS_B1=b1 is not None, HAS_B2=b2 is not None, ACC=acc_dtype(x.dtype),
            BLOCK_C=block_c, BLOCK_P=block_p, **_epilogue_tiles(w1.shape[0], nch), **launch,
        )
    return ChannelState(ca, avg, mx, carg)


def channel_gate_backward(dy, x, state: ChannelState, w1, b1, w2, b2, need_w: bool, *, s=None, dpool=None,
                          sarg=None):
    """Backward pass 1 over dy and x (Σ_p g1 · x per (b, c)), then one small launch for the
    sigmoid's and both MLP branches' backward and, when ``need_w``, the weight gradients. g1 = dy,
    or with ``s``/``dpool``/``sarg`` the gradient at the channel-gated map of cbam_gate.

    Returns gpool (B, 2, C) — [0] gradient per element through the mean (÷ HW), [1] through the
    max (unwritten for pool="avg") — and (dw1, db1, dw2, db2) (None when not ``need_w``; an absent
    bias's gradient None).
    """
    batch, channels, height, width = x.shape
    hidden = w1.shape[0]
    with_max = state.mx is not None
    sd = state.ca.dtype
    block_c, block_p, launch = tile_config(x)
    chunk, nch = _chunking(x, block_c, block_p)
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
    spatial = s is not None
    run = PixelRun(width, dy, x)
    _channel_dot_kernel[(nch, triton.cdiv(channels, block_c), batch)](
        dy, x, dot, s if spatial else dot, dpool if spatial else dot, sarg if spatial else dot,
        *run.strides(dy), *run.strides(x), channels, height * width, run.width, chunk, nch,
        SPATIAL=spatial, ACC=acc_dtype(x.dtype), BLOCK_C=block_c, BLOCK_P=block_p, **launch,
    )
    dw1, db1, dw2, db2 = wgrads or (dz,) * 4
    ca = state.ca
    _channel_mlp_backward_kernel[(batch,)](
        dot, ca, state.avg, ca if state.mx is None else state.mx, *_weights(w1, b1, w2, None)[:3],
        *w1.stride(), *w2.stride(), 0 if b1 is None else b1.stride(0), gpool, dz, dpre, hact,
        dw1, dw1 if db1 is None else db1, dw2, dw2 if db2 is None else db2, counters(x.device),
        channels, height * width, nch, hidden, NEED_W=need_w, WITH_MAX=with_max, HAS_B1=b1 is not None,
        HAS_B2=b2 is not None, ACC=acc_dtype(x.dtype), **_epilogue_tiles(hidden, nch),
        **({} if interpreting() else dict(num_warps=4)),
    )
    return gpool, wgrads


# ----------------------------------------------------------------------------------------------
# Autograd and torch.compile: two torch.library custom ops with fake (meta) kernels
# ----------------------------------------------------------------------------------------------


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


def _channel_gate_forward(
    x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
    pool: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward passes 1 and 2 (two launches): y and the statistics of ChannelState.outputs()."""
    state = channel_gate_state(x, w1, b1, w2, b2, pool)
    return (gate_apply(x, ca=state.ca), *state.outputs())


_channel_gate_op = torch.library.custom_op("attnsr::channel_gate", mutates_args=())(
    on_tensor_device(_channel_gate_forward))


@_channel_gate_op.register_fake
def _(x, w1, b1, w2, b2, pool):
    return (empty_map_like(x), *ChannelState.fake_outputs(x, pool))


def _channel_gate_backward(
    dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
    b2: Optional[torch.Tensor], ca: torch.Tensor, avg: torch.Tensor, mx: torch.Tensor, arg: torch.Tensor,
    pool: str, need_dx: bool, need_w: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dx, dw1, db1, dw2, db2); what is not needed and absent biases' gradients are empty (0,).
    Launches: the dot pass (with the MLP's backward), the weight gradients (``need_w``), dx (``need_dx``)."""
    state = ChannelState.from_outputs(ca, avg, mx, arg, pool)
    gpool, wgrads = channel_gate_backward(dy, x, state, w1, b1, w2, b2, need_w)
    dx = gate_dx(dy, x, ca=ca, gpool=gpool, carg=state.arg) if need_dx else absent_output(x)
    return (dx, *weight_grad_outputs(wgrads, w1, b1, w2, b2))


_channel_gate_backward_op = torch.library.custom_op("attnsr::channel_gate_backward", mutates_args=())(
    on_tensor_device(_channel_gate_backward))


@_channel_gate_backward_op.register_fake
def _(dy, x, w1, b1, w2, b2, ca, avg, mx, arg, pool, need_dx, need_w=True):
    return (empty_map_like(x) if need_dx else absent_output(x), *fake_weight_grads(w1, b1, w2, b2, need_w))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, pool = inputs
    stats = output[1:]
    ctx.mark_non_differentiable(*stats)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics (or an unused y)
    ctx.save_for_backward(x, w1, b1, w2, b2, *stats)
    ctx.pool = pool


def _backward(ctx, dy, *_stat_grads):
    need = ctx.needs_input_grad[:5]
    if dy is None:
        return (None,) * 6
    grads = _channel_gate_backward_op(dy, *ctx.saved_tensors, ctx.pool, need[0], any(need[1:]))
    return (*(g if n else None for g, n in zip(grads, need)), None)


_channel_gate_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast(_channel_gate_op, "channel_gate")
refuse_double_backward(_channel_gate_backward_op, "channel_gate")


def _eager_backward(dy, saved, extra, need):
    return _channel_gate_backward(dy, *saved, *extra, need[0], any(need[1:]))


_EAGER = EagerOp("channel_gate", _channel_gate_forward, _eager_backward, _channel_gate_op)
_CALLS = ValidCalls()


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def check_channel_mlp(op: str, x, w1, b1, w2, b2) -> dict:
    """Validate x (B, C, H, W) and the MLP weights; returns the name -> tensor map of the inputs."""
    check_tensor(op, "x", x)
    check_rank(op, "x", x, 4, "(B, C, H, W)")
    check_tensor(op, "w1", w1)
    check_tensor(op, "w2", w2)
    check_rank(op, "w1", w1, 2, "(C//r, C)")
    check_rank(op, "w2", w2, 2, "(C, C//r)")
    channels = x.shape[1]
    hidden = w1.shape[0]
    if w1.shape[1] != channels or hidden < 1:
        raise ValueError(
            f"{op}: w1 is {tuple(w1.shape)} but x has C = {channels} channels; "
            f"expected w1 (C//r, C) = (hidden, {channels})"
        )
    if tuple(w2.shape) != (channels, hidden):
        raise ValueError(
            f"{op}: w2 is {tuple(w2.shape)}; expected (C, C//r) = ({channels}, {hidden}) for x with C = {channels} "
            f"and w1 {tuple(w1.shape)}"
        )
    tensors = {"x": x, "w1": w1, "w2": w2}
    for name, b, n in (("b1", b1, hidden), ("b2", b2, channels)):
        if b is None:
            continue
        check_tensor(op, name, b)
        if tuple(b.shape) != (n,):
            raise ValueError(f"{op}: {name} is {tuple(b.shape)}; expected ({n},) or None")
        tensors[name] = b
    check_same(op, tensors)
    return tensors


def check_pool(op: str, pool) -> None:
    if pool not in POOLS:
        raise ValueError(f"{op}: pool={pool!r}; expected one of {', '.join(repr(p) for p in POOLS)}")


def channel_gate(x, w1, b1, w2, b2, *, pool="avg"):
    """y = x · sigmoid(mlp(avgpool x)) (pool="avg"), or x · sigmoid(mlp(avg) + mlp(max)) (pool="avgmax").

    x: (B, C, H, W), any strides. mlp(s) = w2 · relu(w1 · s + b1) + b2 with w1: (C//r, C),
    w2: (C, C//r), b1: (C//r,) or None, b2: (C,) or None, all of x's dtype and device.
    Returns (B, C, H, W) in x's dtype, channels_last when x has channels innermost.
    """
    op = "channel_gate"
    (x, w1, b1, w2, b2), sig, seen = repeat_call(_CALLS, op, (x, w1, b1, w2, b2), (pool,))
    if not seen:
        check_pool(op, pool)
        x, w1, b1, w2, b2 = prepare_inputs(op, x, w1, b1, w2, b2)
        check_channel_mlp(op, x, w1, b1, w2, b2)
        check_map_limits(op, x)
        check_runnable(op, x.device)
        _CALLS.remember(sig, True)
    return call_gate(_EAGER, (x, w1, b1, w2, b2), (pool,))
