"""Spatial attention gate (CBAM's spatial half), fused forward and backward.

Maths. For x: (B, C, H, W), with p = h·W + w the flat pixel index:
    mean[b, p] = Σ_c x[b, c, p] / C,   max[b, p] = x[b, sarg[b, p], p]  (sarg: first arg-max channel)
    pre = conv2d([mean, max], weight, bias, padding k//2)     weight: (1, 2, k, k), k odd, zero padding
    s   = sigmoid(pre),   y = x · s[b, p]
Backward, with dy the upstream gradient:
    ds[b, p]   = Σ_c dy · x,   dpre = ds · s · (1 − s)
    d_mean, d_max = the 2→1 convolution transposed, applied to dpre (same zero padding)
    dweight[0, ch, i, j] = Σ_{b, p} dpre[b, p] · stat_ch[b, h + i − k//2, w + j − k//2],  dbias = Σ dpre
    dx = dy · s[b, p] + d_mean[b, p] / C + [c = sarg[b, p]] · d_max[b, p]
The max gradient goes to exactly one channel per pixel: the first (lowest c) attaining the maximum
(NaN counts as the maximum, the first NaN, as in torch.max).

Passes over x-sized tensors (each read or write of a (B, C, H, W) map counts one):
    forward   2 reads, 1 write: (1) x → per-pixel mean, max, arg-max channel;  (2) x → y = x · s
    backward  3 reads, 1 write: (1) dy, x → Σ_c dy·x per pixel;  (2) dy → dx
    saved for backward: x and per-(b, h, w) statistics only: [mean, max] and s (fp32), sarg (int32).
Launches: forward 2, backward 3, no PyTorch op. The convolution + sigmoid forward is the prologue
of the output pass (_gating.py: a program owns a block of pixels and all channels, computes s of
its pixels once and stores it for backward). In backward one small kernel on the (B, 2, H, W)
statistics (2/C of x) computes the transposed convolution together with per-program partial sums
of the weight and bias gradients. The partials, (B, NPB, 2, KK) for the weight (NPB programs per
batch element, KK = k² rounded up to a power of two, the taps past k² zero) and (B, NPB) for the
bias, of about CONV_PROGRAMS programs in all (at least one per batch element) each looping over
its blocks of pixels, are summed in a fixed order by the last program to finish
(``_last_program``): no float atomics, bitwise reproducible. Eager PyTorch reads x three times
(mean, max, multiply) and writes the (B, 2, H, W) concatenation besides y.

Registration: ``attnsr::spatial_gate`` (forward passes with the convolution; returns y and
[mean, max], sarg, s) and ``attnsr::spatial_gate_backward``, torch.library custom ops with fake
kernels, autocast and reverse-mode-only rules as in channel_gate.py.

Limits and precision. x: (B, C, H, W) with any strides; y and dx are channels_last when x has
channels innermost, else contiguous. k odd, 1 ≤ k ≤ 15 (the k² taps of a block of pixels form
one register tile). B ≤ 65535, H·W ≤ 2^31 − 2^16 (int32 pixel indices; every loop bound stays below
2^31, tests/test_index_bounds.py). Statistics, the convolution and the gate are fp32
(float64 for float64 inputs); weight and bias gradients are returned in their own dtype.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ._gating import (
    _block_max,
    _last_program,
    _merge_max,
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

MAX_KERNEL_SIZE = 15
CONV_PROGRAMS = 2048  # programs of the convolution's backward in all, at most: fills a GPU, bounds the partials


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _spatial_stats_kernel(
    X,  # input map (B, C, H, W), any strides
    CA,  # (B, C) ACC: channel gate applied before the statistics (CHANNEL; cbam_gate)
    STATS,  # (B, 2, H·W) contiguous ACC: [0] mean over channels, [1] max over channels
    ARG,  # (B, H·W) contiguous int32: first channel attaining the max
    sx_b, sx_c, sx_h, sx_w,  # x strides (elements)
    C, HW, W,  # channels, pixels per map, map width
    CHANNEL: tl.constexpr,  # statistics of x · ca instead of x
    ACC: tl.constexpr,  # accumulator dtype: fp32 (fp64 for fp64 inputs)
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    b = tl.program_id(1).to(tl.int64)
    p_in = p < HW
    X += b * sx_b
    acc = tl.zeros([BLOCK_P], dtype=ACC)
    run_max = tl.full([BLOCK_P], float("-inf"), dtype=ACC)
    run_arg = tl.zeros([BLOCK_P], dtype=tl.int32) + C  # C = none yet
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_in = c < C
        mask = c_in[:, None] & p_in[None, :]
        x = tl.load(X + _tile_offsets(c, p, W, sx_c, sx_h, sx_w), mask=mask, other=0.0).to(ACC)
        if CHANNEL:
            ca = tl.load(CA + b * C + c, mask=c_in, other=0.0)
            x = x * ca[:, None]
        acc += tl.sum(x, 0)
        blk_max, blk_arg = _block_max(tl.where(mask, x, float("-inf")), c[:, None], C, 0)
        run_max, run_arg = _merge_max(run_max, run_arg, blk_max, blk_arg, C)
    tl.store(STATS + (2 * b) * HW + p, acc / C, mask=p_in)
    tl.store(STATS + (2 * b + 1) * HW + p, run_max, mask=p_in)
    tl.store(ARG + b * HW + p, run_arg, mask=p_in)


@triton.jit
def _spatial_dot_kernel(
    DY, X,  # upstream gradient (any strides, stride 0 included) and input map (B, C, H, W)
    CA,  # (B, C) ACC: channel gate (CHANNEL; cbam_gate)
    S,  # (B, H·W) ACC: spatial gate
    DPRE,  # (B, H·W) contiguous ACC, out: gradient of the pre-sigmoid map, (Σ_c dy·x·ca) · s · (1 − s)
    sdy_b, sdy_c, sdy_h, sdy_w,  # dy strides (elements)
    sx_b, sx_c, sx_h, sx_w,  # x strides
    C, HW, W,  # channels, pixels per map, map width
    CHANNEL: tl.constexpr,  # the spatial gate acts on x · ca
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    b = tl.program_id(1).to(tl.int64)
    p_in = p < HW
    DY += b * sdy_b
    X += b * sx_b
    acc = tl.zeros([BLOCK_P], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_in = c < C
        mask = c_in[:, None] & p_in[None, :]
        g = tl.load(DY + _tile_offsets(c, p, W, sdy_c, sdy_h, sdy_w), mask=mask, other=0.0).to(ACC)
        x = tl.load(X + _tile_offsets(c, p, W, sx_c, sx_h, sx_w), mask=mask, other=0.0).to(ACC)
        if CHANNEL:
            ca = tl.load(CA + b * C + c, mask=c_in, other=0.0)
            x = x * ca[:, None]
        acc += tl.sum(g * x, 0)
    s = tl.load(S + b * HW + p, mask=p_in, other=0.0)
    tl.store(DPRE + b * HW + p, acc * s * (1 - s), mask=p_in)


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
    WT,  # (2, K, K) contiguous ACC: the convolution weight
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


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _conv_config(kernel_size: int):
    """(KK, BLOCK_P, launch kwargs) of the small convolution kernels: BLOCK_P × KK ≈ 2048 on a GPU,
    16 values per thread of each [BLOCK_P, KK] tile with 4 warps (8 warps where 16 pixels × KK
    passes 2048, k ≥ 13). At 4096 the 7×7 backward held 255 registers at the benchmark shape
    (4×128×256², sm_90, triton 3.9 and 3.6; it spilled under 3.8): offsets, masks and three
    loaded tiles are live at once; at 2048 it takes 168 (3.9) / 128 (3.6)."""
    kk = next_pow2(kernel_size * kernel_size)
    if interpreting():
        return kk, 64, {}
    block_p = max(16, 2048 // kk)
    return kk, block_p, dict(num_warps=4 if block_p * kk <= 2048 else 8)


def spatial_stats(x: torch.Tensor, ca=None):
    """One pass over x: [mean, max] over channels (B, 2, H·W) and the first arg-max channel (B, H·W) int32.

    With ``ca`` (B, C) the statistics are those of x · ca (cbam_gate), which is never stored.
    """
    batch, channels, height, width = x.shape
    hw = height * width
    stats = torch.empty((batch, 2, hw), dtype=stat_dtype(x.dtype), device=x.device)
    sarg = torch.empty((batch, hw), dtype=torch.int32, device=x.device)
    if batch > 0:
        block_c, block_p, launch = tile_config(x, loop_over_channels=True)
        run = PixelRun(width, x)
        _spatial_stats_kernel[(triton.cdiv(hw, block_p), batch)](
            x, stats if ca is None else ca, stats, sarg, *run.strides(x), channels, hw, run.width,
            CHANNEL=ca is not None, ACC=acc_dtype(x.dtype), BLOCK_C=block_c, BLOCK_P=block_p, **launch,
        )
    return stats, sarg


def spatial_dot(dy: torch.Tensor, x: torch.Tensor, s: torch.Tensor, ca=None) -> torch.Tensor:
    """One pass over dy and x: dpre = (Σ_c dy · x · ca) · s · (1 − s), (B, H·W)."""
    batch, channels, height, width = x.shape
    hw = height * width
    dpre = torch.empty((batch, hw), dtype=s.dtype, device=x.device)
    if batch > 0:
        block_c, block_p, launch = tile_config(x, loop_over_channels=True)
        run = PixelRun(width, dy, x)
        _spatial_dot_kernel[(triton.cdiv(hw, block_p), batch)](
            dy, x, s if ca is None else ca, s, dpre, *run.strides(dy), *run.strides(x), channels, hw, run.width,
            CHANNEL=ca is not None, ACC=acc_dtype(x.dtype), BLOCK_C=block_c, BLOCK_P=block_p, **launch,
        )
    return dpre


def conv_programs(batch: int, hw: int, block_p: int):
    """(ITERS, NPB) of the convolution's backward: about CONV_PROGRAMS programs in all, NPB per batch
    element, each looping over ITERS blocks of pixels. The weight-gradient partials stay under
    CONV_PROGRAMS × 2 × KK values (4 MiB at k = 15) whatever the map size."""
    iters = triton.cdiv(triton.cdiv(hw, block_p), max(1, CONV_PROGRAMS // max(1, batch)))
    return iters, triton.cdiv(hw, block_p * iters)


def spatial_conv_backward(dpre, stats, weight, bias, channels: int, height: int, width: int):
    """Back through the convolution, one launch: dpool (B, 2, H·W), dweight (1, 2, k, k), dbias (1,) or None."""
    batch, hw = stats.shape[0], height * width
    k = weight.shape[-1]
    kk, block_p, launch = _conv_config(k)
    iters, npb = conv_programs(batch, hw, block_p)
    dpool = torch.empty((batch, 2, hw), dtype=stats.dtype, device=stats.device)
    pw = torch.empty((batch, npb, 2, kk), dtype=stats.dtype, device=stats.device)
    pb = torch.empty((batch, npb), dtype=stats.dtype, device=stats.device)
    dweight = weight.new_empty(weight.shape)
    dbias = None if bias is None else bias.new_empty((1,))
    if batch > 0:
        _spatial_conv_bwd_kernel[(npb, batch)](
            dpre, stats, weight, dpool, pw, pb, dweight, dweight if dbias is None else dbias, counters(stats.device),
            height, width, hw, channels, npb, iters, *weight.stride()[1:],
            HAS_BIAS=bias is not None, K=k, KK=kk, ACC=acc_dtype(stats.dtype), BLOCK_P=block_p,
            BLOCK_N=min(64, next_pow2(batch * npb)), **launch,
        )
    else:
        dweight.zero_()
        if dbias is not None:
            dbias.zero_()
    return dpool, dweight, dbias


# ----------------------------------------------------------------------------------------------
# Autograd and torch.compile: two torch.library custom ops with fake (meta) kernels
# ----------------------------------------------------------------------------------------------


def fake_spatial_state(x: torch.Tensor):
    """Fake (meta) per-pixel statistics of x: [mean, max] (B, 2, H·W), sarg (B, H·W) int32, s (B, H·W)."""
    batch, hw = x.shape[0], x.shape[2] * x.shape[3]
    sd = stat_dtype(x.dtype)
    return (x.new_empty((batch, 2, hw), dtype=sd), x.new_empty((batch, hw), dtype=torch.int32),
            x.new_empty((batch, hw), dtype=sd))


def fake_conv_grads(weight, bias):
    """Fake (meta) dweight (contiguous, like the real one) and dbias (empty (0,) when bias is None)."""
    return weight.new_empty(weight.shape), absent_output(weight) if bias is None else bias.new_empty((1,))


def _spatial_gate_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward passes 1 and 2 (and the small convolution between them): y, stats, sarg, s."""
    stats, sarg = spatial_stats(x)
    y, s = gate_apply(x, conv=(stats, weight, bias))
    return y, stats, sarg, s


_spatial_gate_op = torch.library.custom_op("attnsr::spatial_gate", mutates_args=())(
    on_tensor_device(_spatial_gate_forward))


@_spatial_gate_op.register_fake
def _(x, weight, bias):
    return (empty_map_like(x), *fake_spatial_state(x))


def _spatial_gate_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stats: torch.Tensor,
    sarg: torch.Tensor, s: torch.Tensor, need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward passes 1 and 2: (dx, dweight, dbias); dx and an absent bias's gradient are empty (0,)."""
    channels, height, width = x.shape[1:]
    dpre = spatial_dot(dy, x, s)
    dpool, dweight, dbias = spatial_conv_backward(dpre, stats, weight, bias, channels, height, width)
    dx = gate_dx(dy, x, s=s, dpool=dpool, sarg=sarg) if need_dx else absent_output(x)
    return dx, dweight, absent_output(weight) if dbias is None else dbias


_spatial_gate_backward_op = torch.library.custom_op("attnsr::spatial_gate_backward", mutates_args=())(
    on_tensor_device(_spatial_gate_backward))


@_spatial_gate_backward_op.register_fake
def _(dy, x, weight, bias, stats, sarg, s, need_dx):
    return (empty_map_like(x) if need_dx else absent_output(x), *fake_conv_grads(weight, bias))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    stats = output[1:]
    ctx.mark_non_differentiable(*stats)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics (or an unused y)
    ctx.save_for_backward(x, weight, bias, *stats)


def _backward(ctx, dy, *_stat_grads):
    need = ctx.needs_input_grad
    if dy is None:
        return None, None, None
    grads = _spatial_gate_backward_op(dy, *ctx.saved_tensors, need[0])
    return tuple(g if n else None for g, n in zip(grads, need))


_spatial_gate_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast(_spatial_gate_op, "spatial_gate")
refuse_double_backward(_spatial_gate_backward_op, "spatial_gate")


def _eager_backward(dy, saved, extra, need):
    return _spatial_gate_backward(dy, *saved, need[0])


_EAGER = EagerOp("spatial_gate", _spatial_gate_forward, _eager_backward, _spatial_gate_op)
_CALLS = ValidCalls()


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def check_spatial_conv(op: str, x, weight, bias, names=("weight", "bias")) -> dict:
    """Validate the (1, 2, k, k) weight (k odd, ≤ 15) and the (1,) bias; returns name -> tensor."""
    wname, bname = names
    check_tensor(op, wname, weight)
    check_rank(op, wname, weight, 4, "(1, 2, k, k)")
    k = weight.shape[-1]
    if weight.shape[:2] != (1, 2) or weight.shape[2] != k:
        raise ValueError(
            f"{op}: {wname} is {tuple(weight.shape)}; expected (1, 2, k, k): one output map from the "
            "[mean, max] pair, a square k×k kernel"
        )
    if k % 2 == 0 or not 1 <= k <= MAX_KERNEL_SIZE:
        raise ValueError(
            f"{op}: {wname} has kernel size k = {k}; expected an odd k from 1 to {MAX_KERNEL_SIZE} "
            "(padding k//2 keeps the map size only for odd k)"
        )
    tensors = {"x": x, wname: weight}
    if bias is not None:
        check_tensor(op, bname, bias)
        if tuple(bias.shape) != (1,):
            raise ValueError(f"{op}: {bname} is {tuple(bias.shape)}; expected (1,) or None")
        tensors[bname] = bias
    return tensors


def spatial_gate(x, weight, bias=None):
    """y = x · sigmoid(conv2d([mean_c x, max_c x], weight, bias, padding k//2)).

    x: (B, C, H, W), any strides; weight: (1, 2, k, k) with k odd (the channel-mean map is input 0,
    the channel-max map input 1); bias: (1,) or None; all of x's dtype and device.
    Returns (B, C, H, W) in x's dtype, channels_last when x has channels innermost.
    """
    op = "spatial_gate"
    (x, weight, bias), sig, seen = repeat_call(_CALLS, op, (x, weight, bias), ())
    if not seen:
        x, weight, bias = prepare_inputs(op, x, weight, bias)
        check_tensor(op, "x", x)
        check_rank(op, "x", x, 4, "(B, C, H, W)")
        check_same(op, check_spatial_conv(op, x, weight, bias))
        check_map_limits(op, x)
        check_runnable(op, x.device)
        _CALLS.remember(sig, True)
    return call_gate(_EAGER, (x, weight, bias), ())
