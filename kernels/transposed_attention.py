"""Transposed (channel) self-attention: Restormer's MDTA, fused forward and backward.

Maths. For each batch element b and head h, let Q, K, V: (d, N) be the head's d = C/heads channels
over the N = H·W pixels of the (B, C, H, W) maps q, k, v. With n_q[c] = ‖Q_c‖, n̄_q[c] =
max(n_q[c], eps) (eps = 1e-12, F.normalize's), likewise for K, and τ_h the head's temperature:
    Ĝ = diag(1/n̄_q) Q Kᵀ diag(1/n̄_k)        (d × d: the cosines of Q̂ = Q/n̄_q and K̂ = K/n̄_k)
    S = τ_h Ĝ,  A = softmax_rows(S),  O = A V  (d × N)
Backward, for the upstream gradient dO:
    dA = dO Vᵀ,  dS = A ∘ (dA − rowsum(dA ∘ A)),  M = τ_h dS  (= dĜ),  dV = Aᵀ dO
    dQ = diag(1/n̄_q) M K̂ − diag(b_q) Q,   b_q[c]  = Σ_c' M[c, c'] Ĝ[c, c'] / n̄_q[c]²
    dK = diag(1/n̄_k) Mᵀ Q̂ − diag(b_k) K,  b_k[c'] = Σ_c  M[c, c'] Ĝ[c, c'] / n̄_k[c']²
    dτ_h = Σ_b Σ dS ∘ Ĝ
where b_q[c] = 0 for a row with n_q[c] < eps (F.normalize divides it by the constant eps there, so
the projection term vanishes); likewise b_k.

Passes. No N × N or per-token intermediate is ever made; the d × d matrices live in fp32 buffers.
    forward   1. statistics: programs over (b·h, token split) sum Q Kᵀ (a tl.dot over token
                 blocks), ‖Q_c‖² and ‖K_c‖² over their token range into fp32 partials per split;
              2. softmax: one program per (b, h) sums the partials in split order (deterministic),
                 stores Ĝ, A (B, heads, DP, DP) and the norms n_q, n_k (B, heads, DP), fp32;
              3. apply: programs over (b·h, token block) write O = A V (A rounded to the input
                 dtype for the dot, as torch's matmul in that dtype) in q's layout.
    backward  1. dA partials = dO Vᵀ over token splits, as forward pass 1;
              2. finalize: one program per head loops over the batch in order: dS, M, b_q, b_k and
                 dτ_h (the batch sum in a fixed order: deterministic, no atomics);
              3. apply: programs over (b·h, token block) read q, k, dO once and write dq, dk, dv.
    Map-sized reads and writes: forward reads q, k once (pass 1) and v once (pass 3) and writes the
    output once; backward reads dO, v (pass 1) and q, k, dO (pass 3) and writes dq, dk, dv once.
    Launches: 3 forward, 3 backward.
The number of token splits of the reduction passes is chosen so that B·heads·splits ≥ 2 × the
GPU's SM count (read once per device; 4 under the interpreter), capped by the token blocks.

Registration: ``attnsr::transposed_attention`` (returns the output and the saved statistics) and
``attnsr::transposed_attention_backward``, torch.library custom ops with fake kernels, serve
torch.compile and torch.func; eager calls take a plain autograd Function. Autocast casts q, k, v
and the temperature to the region's dtype (float64 excepted), as for the other ops.

Limits and precision. d = C/heads ≤ 128 (the d × d matrices live in registers, padded to a power
of two DP ≥ 16 for tl.dot); H·W ≤ 2^31 − 2^16; B·heads ≤ 65535 (grid axis 1 of the apply
passes). Statistics and accumulation in fp32 (float64 for float64 inputs); fp32 dots use the
precision of ``dot_precision`` (3×TF32 by default on a GPU: about fp32 accuracy).
No double backward, no forward-mode AD.
"""


import torch
import triton
import triton.language as tl

from ._gating import PixelRun, _tile_offsets
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
    check_tensor,
    device_guard,
    dot_dtype,
    dot_precision,
    empty_map_like,
    grad_layout,
    grad_views,
    interpreting,
    next_pow2,
    on_tensor_device,
    packed_base,
    positive_int,
    refuse_double_backward,
    refuse_twice,
    sm_count,
    ValidCalls,
    register_autocast,
    stat_dtype,
)

EPS = 1e-12  # F.normalize's default eps
MAX_HEAD_CHANNELS = 128

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _head_tile(X, b, h, d, c, n, W, s_b, s_c, s_h, s_w):
    """Pointers of the [DP, BLOCK_N] tile of channels c (of head h: channels h·d + c) × pixels n
    of batch element b in a (B, C, H, W) map with strides s_*."""
    return X + b * s_b + (h * d).to(tl.int64) * s_c + _tile_offsets(c, n, W, s_c, s_h, s_w)


@triton.jit
def _mdta_gram_kernel(
    X, Y,  # (B, C, H, W) maps, any strides: q and k (forward), dO and v (backward)
    PART,  # (B·heads, SPLITS, DP, DP) contiguous ACC, out: this split's Σ_n X[:, n] Y[:, n]ᵀ
    PX, PY,  # (B·heads, SPLITS, DP) contiguous ACC, out: Σ_n X² and Σ_n Y² per channel (NORMS)
    sx_b, sx_c, sx_h, sx_w,  # X strides (elements)
    sy_b, sy_c, sy_h, sy_w,  # Y strides
    heads, d, N, W,  # heads, channels per head, pixels H·W, map width as the addressing sees it
    SPLITS, BLOCKS,  # token splits, token blocks per split
    NORMS: tl.constexpr,  # also sum the squares (forward)
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,  # accumulator / dot operand dtypes
    DP: tl.constexpr, BLOCK_N: tl.constexpr,  # padded head channels, token block
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    c = tl.arange(0, DP)
    cm = c < d
    g = tl.zeros([DP, DP], dtype=ACC)
    nx = tl.zeros([DP], dtype=ACC)
    ny = tl.zeros([DP], dtype=ACC)
    for i in range(BLOCKS):
        n = (split * BLOCKS + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = cm[:, None] & (n < N)[None, :]
        x = tl.load(_head_tile(X, b, h, d, c, n, W, sx_b, sx_c, sx_h, sx_w), mask=m, other=0.0)
        y = tl.load(_head_tile(Y, b, h, d, c, n, W, sy_b, sy_c, sy_h, sy_w), mask=m, other=0.0)
        g = tl.dot(x.to(DOT), tl.trans(y.to(DOT)), g, input_precision=PRECISION, out_dtype=ACC)
        if NORMS:
            xf = x.to(ACC)
            yf = y.to(ACC)
            nx += tl.sum(xf * xf, 1)
            ny += tl.sum(yf * yf, 1)
    slot = (bh * SPLITS + split).to(tl.int64)
    tl.store(PART + slot * DP * DP + c[:, None] * DP + c[None, :], g)
    if NORMS:
        tl.store(PX + slot * DP + c, nx)
        tl.store(PY + slot * DP + c, ny)


@triton.jit
def _mdta_softmax_kernel(
    PART, PQ, PK,  # the statistics pass's partials (B·heads, SPLITS, DP, DP) and (B·heads, SPLITS, DP)
    TAU,  # (heads, ...) temperature, stride st_h along heads, its own dtype
    GH, A,  # (B·heads, DP, DP) contiguous ACC, out: cosines Ĝ and probabilities A (0 outside d × d)
    NQ, NK,  # (B·heads, DP) contiguous ACC, out: the norms ‖Q_c‖, ‖K_c‖ (not clamped)
    st_h,  # temperature stride along heads
    heads, d, SPLITS,  # heads, channels per head, token splits
    eps: tl.float64,  # F.normalize's eps (fp64: a float64 call keeps it exact)
    ACC: tl.constexpr, DP: tl.constexpr,
):
    if ACC != tl.float64:  # fp32 kernels compare in fp32
        eps = tl.cast(eps, ACC)
    bh = tl.program_id(0).to(tl.int64)
    h = bh % heads
    c = tl.arange(0, DP)
    tile = c[:, None] * DP + c[None, :]
    g = tl.zeros([DP, DP], dtype=ACC)
    sq = tl.zeros([DP], dtype=ACC)
    sk = tl.zeros([DP], dtype=ACC)
    for s in range(SPLITS):  # in split order: the same sum on every run
        slot = bh * SPLITS + s
        g += tl.load(PART + slot * DP * DP + tile)
        sq += tl.load(PQ + slot * DP + c)
        sk += tl.load(PK + slot * DP + c)
    nq = tl.sqrt(sq)
    nk = tl.sqrt(sk)
    gh = g / (tl.maximum(nq, eps)[:, None] * tl.maximum(nk, eps)[None, :])
    valid = (c[:, None] < d) & (c[None, :] < d)
    s = tl.where(c[None, :] < d, tl.load(TAU + h * st_h).to(ACC) * gh, float("-inf"))  # padded rows: 0s, no NaN
    e = tl.exp(s - tl.max(s, 1)[:, None])
    a = tl.where(valid, e / tl.sum(e, 1)[:, None], 0.0)
    tl.store(GH + bh * DP * DP + tile, tl.where(valid, gh, 0.0))
    tl.store(A + bh * DP * DP + tile, a)
    tl.store(NQ + bh * DP + c, nq)
    tl.store(NK + bh * DP + c, nk)


@triton.jit
def _mdta_apply_kernel(
    A,  # (B·heads, DP, DP) contiguous ACC: the probabilities
    V, OUT,  # (B, C, H, W) v and the output, any strides
    sv_b, sv_c, sv_h, sv_w,  # v strides
    so_b, so_c, so_h, so_w,  # output strides
    heads, d, N, W,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    DP: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(1)  # pixel blocks on grid axis 0 (up to 2^31 - 1), B·heads on axis 1
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    c = tl.arange(0, DP)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = (c < d)[:, None] & (n < N)[None, :]
    a = tl.load(A + bh.to(tl.int64) * DP * DP + c[:, None] * DP + c[None, :])
    v = tl.load(_head_tile(V, b, h, d, c, n, W, sv_b, sv_c, sv_h, sv_w), mask=m, other=0.0)
    o = tl.dot(a.to(V.dtype.element_ty).to(DOT), v.to(DOT), input_precision=PRECISION, out_dtype=ACC)
    tl.store(_head_tile(OUT, b, h, d, c, n, W, so_b, so_c, so_h, so_w), o.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _mdta_grad_finalize_kernel(
    PART,  # (B·heads, SPLITS, DP, DP) contiguous ACC: partials of dA = dO Vᵀ
    A, GH, NQ, NK,  # the forward's statistics (see _mdta_softmax_kernel)
    TAU,  # temperature, stride st_h along heads
    M,  # (B·heads, DP, DP) contiguous ACC, out: M = τ dS
    BQ, BK,  # (B·heads, DP) contiguous ACC, out: b_q, b_k (0 where the norm is below eps)
    DTAU,  # temperature gradient, out, stride sdt_h along heads, the temperature's dtype (NEED_TAU)
    st_h, sdt_h,
    B, heads, d, SPLITS,
    eps: tl.float64,
    NEED_TAU: tl.constexpr,
    ACC: tl.constexpr, DP: tl.constexpr,
):
    if ACC != tl.float64:  # fp32 kernels compare in fp32
        eps = tl.cast(eps, ACC)
    h = tl.program_id(0)
    c = tl.arange(0, DP)
    tile = c[:, None] * DP + c[None, :]
    tau = tl.load(TAU + h * st_h).to(ACC)
    dtau = tl.zeros([DP], dtype=ACC)
    for b in range(B):  # in batch order: dτ is summed the same way on every run
        bh = (b * heads + h).to(tl.int64)
        da = tl.zeros([DP, DP], dtype=ACC)
        for s in range(SPLITS):
            da += tl.load(PART + (bh * SPLITS + s) * DP * DP + tile)
        a = tl.load(A + bh * DP * DP + tile)
        gh = tl.load(GH + bh * DP * DP + tile)
        ds = a * (da - tl.sum(da * a, 1)[:, None])
        mm = tau * ds
        tl.store(M + bh * DP * DP + tile, mm)
        nq = tl.load(NQ + bh * DP + c)
        nk = tl.load(NK + bh * DP + c)
        cq = tl.maximum(nq, eps)
        ck = tl.maximum(nk, eps)
        tl.store(BQ + bh * DP + c, tl.where(nq >= eps, tl.sum(mm * gh, 1) / (cq * cq), 0.0))
        tl.store(BK + bh * DP + c, tl.where(nk >= eps, tl.sum(mm * gh, 0) / (ck * ck), 0.0))
        if NEED_TAU:
            dtau += tl.sum(ds * gh, 1)
    if NEED_TAU:
        tl.store(DTAU + h * sdt_h, tl.sum(dtau, 0).to(DTAU.dtype.element_ty))


@triton.jit
def _mdta_grad_apply_kernel(
    Q, K, DO,  # (B, C, H, W) q, k and the upstream gradient, any strides (stride 0 included)
    DQ, DK, DV,  # (B, C, H, W) gradients, out, any strides
    M, A,  # (B·heads, DP, DP) contiguous ACC: M = τ dS and the probabilities
    BQ, BK, NQ, NK,  # (B·heads, DP) contiguous ACC: b_q, b_k and the norms
    sq_b, sq_c, sq_h, sq_w,  # q strides
    sk_b, sk_c, sk_h, sk_w,  # k strides
    sd_b, sd_c, sd_h, sd_w,  # dO strides
    sgq_b, sgq_c, sgq_h, sgq_w,  # dq strides
    sgk_b, sgk_c, sgk_h, sgk_w,  # dk strides
    sgv_b, sgv_c, sgv_h, sgv_w,  # dv strides
    heads, d, N, W,
    eps: tl.float64,
    NEED_QK: tl.constexpr, NEED_V: tl.constexpr,  # which gradients to write
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    DP: tl.constexpr, BLOCK_N: tl.constexpr,
):
    if ACC != tl.float64:  # fp32 kernels compare in fp32
        eps = tl.cast(eps, ACC)
    bh = tl.program_id(1)  # pixel blocks on grid axis 0, B·heads on axis 1
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    mat = bh.to(tl.int64) * DP * DP
    c = tl.arange(0, DP)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (c < d)[:, None] & (n < N)[None, :]
    if NEED_QK:
        vec = bh.to(tl.int64) * DP + c
        nq = tl.maximum(tl.load(NQ + vec), eps)
        nk = tl.maximum(tl.load(NK + vec), eps)
        q = tl.load(_head_tile(Q, b, h, d, c, n, W, sq_b, sq_c, sq_h, sq_w), mask=mask, other=0.0).to(ACC)
        k = tl.load(_head_tile(K, b, h, d, c, n, W, sk_b, sk_c, sk_h, sk_w), mask=mask, other=0.0).to(ACC)
        # the normalised operands and M rounded to the input dtype, as torch's matmuls in that dtype
        kh = (k / nk[:, None]).to(Q.dtype.element_ty).to(DOT)
        m = tl.load(M + mat + c[:, None] * DP + c[None, :]).to(Q.dtype.element_ty).to(DOT)
        dq = tl.dot(m, kh, input_precision=PRECISION, out_dtype=ACC) / nq[:, None]
        dq -= tl.load(BQ + vec)[:, None] * q
        tl.store(_head_tile(DQ, b, h, d, c, n, W, sgq_b, sgq_c, sgq_h, sgq_w), dq.to(DQ.dtype.element_ty), mask=mask)
        qh = (q / nq[:, None]).to(Q.dtype.element_ty).to(DOT)
        mt = tl.load(M + mat + c[None, :] * DP + c[:, None]).to(Q.dtype.element_ty).to(DOT)  # Mᵀ
        dk = tl.dot(mt, qh, input_precision=PRECISION, out_dtype=ACC) / nk[:, None]
        dk -= tl.load(BK + vec)[:, None] * k
        tl.store(_head_tile(DK, b, h, d, c, n, W, sgk_b, sgk_c, sgk_h, sgk_w), dk.to(DK.dtype.element_ty), mask=mask)
    if NEED_V:
        do = tl.load(_head_tile(DO, b, h, d, c, n, W, sd_b, sd_c, sd_h, sd_w), mask=mask, other=0.0)
        at = tl.load(A + mat + c[None, :] * DP + c[:, None]).to(DO.dtype.element_ty).to(DOT)  # Aᵀ
        dv = tl.dot(at, do.to(DOT), input_precision=PRECISION, out_dtype=ACC)
        tl.store(_head_tile(DV, b, h, d, c, n, W, sgv_b, sgv_c, sgv_h, sgv_w), dv.to(DV.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (``_runtime.sm_count``); 4 under the interpreter and on CPU."""
    return 4 if device.type != "cuda" or interpreting() else sm_count(device)


def _settings(dp: int, dtype: torch.dtype, kernel: str):
    """(BLOCK_N, launch kwargs) by rule: the d × d matrices (DP² fp32) and the [DP, BLOCK_N] tiles
    share the registers of num_warps warps; the backward apply holds two accumulators, its three
    d × d operands and two tiles, so it takes 8 warps from DP = 64 (and 32 tokens in fp32). float64
    halves the token block. Figures for sm_90: docs/kernels.md."""
    block_n = 64 if dp <= 64 else 32
    if dtype == torch.float64:
        block_n = max(16, block_n // 2)
    warps = 4 if dp <= 32 else 8
    if kernel == "grad_apply" and dp >= 64:
        warps = 8
        if dtype == torch.float32:  # 3×TF32 splits each operand in two: at 64 tokens sm_90 spilled 72-144 B
            block_n = 32
    if kernel == "softmax":  # one program per (b, h) on DP × DP values: no token tile
        warps = 4 if dp <= 64 else 8
    if kernel == "grad_finalize":  # the backward's per-head step: several DP × DP matrices live at once
        warps = 4 if dp <= 64 else 8
        if dtype == torch.float64 and dp >= 64:  # float64 at DP 64: 4 warps spilled 176 B, 8 take 168 regs
            warps = 8
    return block_n, dict(num_warps=warps, num_stages=2)


def _splits(device, batch_heads: int, n: int, block_n: int):
    """(splits, token blocks per split): B·heads·splits ≥ 2 × the SM count, capped by the blocks."""
    blocks = triton.cdiv(n, block_n)
    want = max(1, triton.cdiv(2 * _sm_count(device), batch_heads))
    per = triton.cdiv(blocks, min(want, blocks))
    return triton.cdiv(blocks, per), per


def _gram(x, y, heads: int, d: int, dp: int, norms: bool):
    """Pass 1 of forward (q, k: norms) and backward (dO, v): the split partials."""
    batch, _, height, width = x.shape
    n = height * width
    acc = stat_dtype(x.dtype)
    block_n, launch = _settings(dp, x.dtype, "gram")
    splits, per = _splits(x.device, batch * heads, n, block_n)
    part = torch.empty((batch * heads, splits, dp, dp), dtype=acc, device=x.device)
    px = torch.empty((batch * heads, splits, dp), dtype=acc, device=x.device) if norms else part
    py = torch.empty_like(px) if norms else part
    run = PixelRun(width, x, y)
    _mdta_gram_kernel[(batch * heads, splits)](
        x, y, part, px, py, *run.strides(x), *run.strides(y), heads, d, n, run.width, splits, per,
        NORMS=norms, ACC=acc_dtype(x.dtype), DOT=dot_dtype(x.dtype), PRECISION=dot_precision(x.dtype),
        DP=dp, BLOCK_N=block_n, **launch,
    )
    return part, px, py, splits


def transposed_attention_forward(q, k, v, temperature, heads: int):
    """Returns (out, A, Ĝ, n_q, n_k): the output (B, C, H, W) in q's layout and the statistics
    (B·heads, DP, DP) and (B·heads, DP) saved for the backward."""
    batch, channels, height, width = q.shape
    d = channels // heads
    dp = max(16, next_pow2(d))
    acc = stat_dtype(q.dtype)
    out = empty_map_like(q)
    attn = torch.empty((batch * heads, dp, dp), dtype=acc, device=q.device)
    gram = torch.empty_like(attn)
    nq = torch.empty((batch * heads, dp), dtype=acc, device=q.device)
    nk = torch.empty_like(nq)
    if batch == 0:
        return out, attn, gram, nq, nk
    n = height * width
    part, pq, pk, splits = _gram(q, k, heads, d, dp, True)
    _, launch = _settings(dp, q.dtype, "softmax")
    _mdta_softmax_kernel[(batch * heads,)](
        part, pq, pk, temperature, gram, attn, nq, nk, temperature.stride(0), heads, d, splits, EPS,
        ACC=acc_dtype(q.dtype), DP=dp, **launch,
    )
    block_n, launch = _settings(dp, q.dtype, "apply")
    run = PixelRun(width, v, out)
    _mdta_apply_kernel[(triton.cdiv(n, block_n), batch * heads)](
        attn, v, out, *run.strides(v), *run.strides(out), heads, d, n, run.width,
        ACC=acc_dtype(q.dtype), DOT=dot_dtype(q.dtype), PRECISION=dot_precision(q.dtype), DP=dp, BLOCK_N=block_n,
        **launch,
    )
    return out, attn, gram, nq, nk


def transposed_attention_backward(do, q, k, v, temperature, attn, gram, nq, nk, heads: int,
                                  need_qk: bool, need_v: bool, need_tau: bool, grads=None):
    """Returns (dq, dk, dv, dtemperature); absent ones (not needed) as None. ``grads``: (dq, dk, dv)
    to write into (views of one packed gradient buffer, ``grad_views``), else fresh maps."""
    batch, channels, height, width = q.shape
    d = channels // heads
    dp = attn.shape[-1]
    n = height * width
    if grads is not None:
        dq, dk, dv = grads
    else:
        dq, dk = (empty_map_like(q), empty_map_like(k)) if need_qk else (None, None)
        dv = empty_map_like(v) if need_v else None
    dtau = torch.empty_like(temperature) if need_tau else None
    if batch == 0:
        if dtau is not None:
            dtau.zero_()
        return dq, dk, dv, dtau
    if need_qk or need_tau:
        part, _, _, splits = _gram(do, v, heads, d, dp, False)
        m = torch.empty_like(attn)
        bq = torch.empty_like(nq)
        bk = torch.empty_like(nk)
        _, launch = _settings(dp, q.dtype, "grad_finalize")
        _mdta_grad_finalize_kernel[(heads,)](
            part, attn, gram, nq, nk, temperature, m, bq, bk, temperature if dtau is None else dtau,
            temperature.stride(0), temperature.stride(0) if dtau is None else dtau.stride(0),
            batch, heads, d, splits, EPS, NEED_TAU=need_tau, ACC=acc_dtype(q.dtype), DP=dp, **launch,
        )
    else:
        m, bq, bk = attn, nq, nk  # not read
    if need_qk or need_v:
        block_n, launch = _settings(dp, q.dtype, "grad_apply")
        gq = dq if need_qk else q
        gk = dk if need_qk else k
        gv = dv if need_v else v
        run = PixelRun(width, q, k, do, gq, gk, gv)
        _mdta_grad_apply_kernel[(triton.cdiv(n, block_n), batch * heads)](
            q, k, do, gq, gk, gv, m, attn, bq, bk, nq, nk,
            *run.strides(q), *run.strides(k), *run.strides(do), *run.strides(gq), *run.strides(gk),
            *run.strides(gv), heads, d, n, run.width, EPS, NEED_QK=need_qk, NEED_V=need_v,
            ACC=acc_dtype(q.dtype), DOT=dot_dtype(q.dtype), PRECISION=dot_precision(q.dtype), DP=dp,
            BLOCK_N=block_n, **launch,
        )
    return dq, dk, dv, dtau


# ----------------------------------------------------------------------------------------------
# Autograd and torch.compile: two torch.library custom ops with fake (meta) kernels
# ----------------------------------------------------------------------------------------------


def _stat_shapes(q, heads: int):
    d = q.shape[1] // heads
    dp = max(16, next_pow2(d))
    return (q.shape[0] * heads, dp, dp), (q.shape[0] * heads, dp)


@torch.library.custom_op("attnsr::transposed_attention", mutates_args=())
@on_tensor_device
def _transposed_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor, heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, A, Ĝ, n_q, n_k): the output and the statistics the backward reads."""
    return transposed_attention_forward(q, k, v, temperature, heads)


@_transposed_attention_op.register_fake
def _(q, k, v, temperature, heads):
    mat, vec = _stat_shapes(q, heads)
    acc = stat_dtype(q.dtype)
    return (empty_map_like(q), q.new_empty(mat, dtype=acc), q.new_empty(mat, dtype=acc),
            q.new_empty(vec, dtype=acc), q.new_empty(vec, dtype=acc))


@torch.library.custom_op("attnsr::transposed_attention_backward", mutates_args=())
@on_tensor_device
def _transposed_attention_backward_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
    attn: torch.Tensor, gram: torch.Tensor, nq: torch.Tensor, nk: torch.Tensor, heads: int,
    need_qk: bool, need_v: bool, need_tau: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dtemperature); an absent one as an empty (0,) tensor."""
    grads = transposed_attention_backward(do, q, k, v, temperature, attn, gram, nq, nk, heads,
                                          need_qk, need_v, need_tau)
    return tuple(absent_output(like) if g is None else g for g, like in zip(grads, (q, k, v, temperature)))


@_transposed_attention_backward_op.register_fake
def _(do, q, k, v, temperature, attn, gram, nq, nk, heads, need_qk, need_v, need_tau):
    return (empty_map_like(q) if need_qk else absent_output(q), empty_map_like(k) if need_qk else absent_output(k),
            empty_map_like(v) if need_v else absent_output(v),
            torch.empty_like(temperature) if need_tau else absent_output(temperature))


def _setup_context(ctx, inputs, output):
    q, k, v, temperature, heads = inputs
    _, attn, gram, nq, nk = output
    ctx.mark_non_differentiable(attn, gram, nq, nk)
    ctx.save_for_backward(q, k, v, temperature, attn, gram, nq, nk)
    ctx.heads = heads


def _backward(ctx, do, *_stats):
    q, k, v, temperature, attn, gram, nq, nk = ctx.saved_tensors
    need_q, need_k, need_v, need_tau = ctx.needs_input_grad[:4]
    dq, dk, dv, dtau = _transposed_attention_backward_op(
        do, q, k, v, temperature, attn, gram, nq, nk, ctx.heads, need_q or need_k, need_v, need_tau)
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None,
            dtau if need_tau else None, None)


_transposed_attention_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast(_transposed_attention_op, "transposed_attention", cast_first=4)
refuse_double_backward(_transposed_attention_backward_op, "transposed_attention")


class _TransposedAttentionFunction(torch.autograd.Function):
    """The eager path of ``transposed_attention``: the launchers called directly (the custom ops
    above serve torch.compile and torch.func). Inputs: q, k, v, the temperature, heads, and
    ``base``: None, or the (B, 3C, H, W) tensor whose three channel chunks q, k, v are (then they
    come detached and the backward writes one gradient buffer for the base: no ``cat``;
    ``transposed_attention_qkv``)."""

    @staticmethod
    def forward(ctx, q, k, v, temperature, heads, base):
        with device_guard(q):
            out, attn, gram, nq, nk = transposed_attention_forward(q, k, v, temperature, heads)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, temperature, attn, gram, nq, nk, base)
        ctx.heads = heads
        ctx.grad_layout = None if base is None else grad_layout(base, (q, k, v))
        return out

    @staticmethod
    def backward(ctx, do):
        if do is None:
            return None, None, None, None, None, None
        q, k, v, temperature, attn, gram, nq, nk, base = ctx.saved_tensors
        need_q, need_k, need_v, need_tau = ctx.needs_input_grad[:4]
        if base is not None:
            dbase, views = grad_views(ctx.grad_layout)
            with device_guard(q):
                _, _, _, dtau = transposed_attention_backward(
                    do, q, k, v, temperature, attn, gram, nq, nk, ctx.heads, True, True, need_tau, views)
            dbase, dtau = refuse_twice("transposed_attention", (base, temperature),
                                       (dbase, dtau if need_tau else None))
            return None, None, None, dtau, None, dbase
        with device_guard(q):
            dq, dk, dv, dtau = transposed_attention_backward(
                do, q, k, v, temperature, attn, gram, nq, nk, ctx.heads, need_q or need_k, need_v, need_tau)
        grads = refuse_twice("transposed_attention", (q, k, v, temperature),
                             (dq if need_q else None, dk if need_k else None, dv if need_v else None,
                              dtau if need_tau else None))
        return (*grads, None, None)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def _check(op, q, k, v, temperature, heads):
    for name, t in (("q", q), ("k", k), ("v", v), ("temperature", temperature)):
        check_tensor(op, name, t)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_rank(op, name, t, 4, "(B, C, H, W)")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{op}: q is {tuple(q.shape)} but {name} is {tuple(t.shape)}; "
                             "q, k and v must share B, C, H, W")
    check_same(op, {"q": q, "k": k, "v": v, "temperature": temperature})
    heads = positive_int(op, "heads", heads)
    _, channels, height, width = q.shape
    if channels % heads:
        raise ValueError(f"{op}: C = {channels} channels do not split into heads = {heads}; "
                         "expected C divisible by heads")
    d = channels // heads
    if d > MAX_HEAD_CHANNELS:
        raise ValueError(f"{op}: C / heads = {channels} / {heads} = {d} channels per head; expected at most "
                         f"{MAX_HEAD_CHANNELS} (the d × d matrices live in registers)")
    if d < 1 or height < 1 or width < 1:
        raise ValueError(f"{op}: q is {tuple(q.shape)}; expected C, H and W ≥ 1")
    if q.shape[0] * heads > MAX_GRID_YZ:
        raise ValueError(f"{op}: B·heads = {q.shape[0]}·{heads} = {q.shape[0] * heads}; expected at most {MAX_GRID_YZ} "
                         "(a grid axis of the apply kernels)")
    if height * width > MAX_INDEX:
        raise ValueError(f"{op}: H·W = {height * width} pixels; expected at most {MAX_INDEX}")
    if tuple(temperature.shape) not in ((heads,), (heads, 1, 1)):
        raise ValueError(f"{op}: temperature is {tuple(temperature.shape)}; expected ({heads}, 1, 1) "
                         f"(Restormer's parameter) or ({heads},), one value per head")
    check_runnable(op, q.device)
    return heads


_CALLS = ValidCalls()


def _checked_heads(op: str, tensors: tuple, heads, check):
    """``check()`` (the op's input checks, returning the validated head count) on a call signature
    not seen before; on a repeated one (shapes, strides, dtypes, devices, heads: ``ValidCalls``) the
    head count it gave then, with no check run. Tensors that are not tensors are always checked."""
    sig, seen = _CALLS.lookup(tensors, (op, heads)) if all(isinstance(t, torch.Tensor) for t in tensors) \
        else (None, None)
    if seen is not None:
        if tensors[0].device.type != "cuda":
            check_runnable(op, tensors[0].device)
        return seen
    heads = check()
    _CALLS.remember(sig, heads)
    return heads


def transposed_attention(q, k, v, temperature, *, heads):
    """Restormer's transposed (channel) attention, fused: per head, softmax over channels of
    τ · normalize(Q) normalize(K)ᵀ (a d × d matrix, d = C / heads) applied to V.

    q, k, v: (B, C, H, W), any strides (views of one (B, 3C, H, W) map, channels_last, NCHW);
    temperature: (heads, 1, 1) or (heads,), τ per head; all of one dtype and device.
    Returns (B, C, H, W) in q's dtype, channels_last when q has channels innermost.
    """
    op = "transposed_attention"
    q, k, v, temperature = autocast_inputs(q, k, v, temperature)
    heads = _checked_heads(op, (q, k, v, temperature), heads, lambda: _check(op, q, k, v, temperature, heads))
    check_no_forward_ad(op, q, k, v, temperature)
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return _transposed_attention_op(q, k, v, temperature, heads)[0]
    return _TransposedAttentionFunction.apply(q, k, v, temperature, heads, None)


def transposed_attention_qkv(qkv, temperature, *, heads):
    """``transposed_attention(*qkv.chunk(3, dim=1), temperature, heads=heads)`` for the packed
    (B, 3C, H, W) output of one convolution (Restormer's ``qkv_dwconv``), any strides. In eager mode
    its backward writes qkv's gradient as one buffer laid out like qkv (no ``cat`` of three
    gradients); under torch.compile / torch.func it runs the custom op on the three chunks."""
    op = "transposed_attention_qkv"
    qkv, temperature = autocast_inputs(qkv, temperature)

    def check():
        check_tensor(op, "qkv", qkv)
        check_rank(op, "qkv", qkv, 4, "(B, 3C, H, W)")
        if qkv.shape[1] % 3:
            raise ValueError(f"{op}: qkv is {tuple(qkv.shape)}; expected (B, 3C, H, W), 3C channels")
        return _check(op, *qkv.chunk(3, dim=1), temperature, heads)

    heads = _checked_heads(op, (qkv, temperature), heads, check)
    q, k, v = qkv.chunk(3, dim=1)
    check_no_forward_ad(op, qkv, temperature)
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return _transposed_attention_op(q, k, v, temperature, heads)[0]
    base = packed_base(qkv)
    if base is None:
        return _TransposedAttentionFunction.apply(q, k, v, temperature, heads, None)
    return _TransposedAttentionFunction.apply(q.detach(), k.detach(), v.detach(), temperature, heads, base)
