"""Flash-style self-attention over token sequences and over the pixels or patches of feature maps.

Maths. For one (batch, head): S = Q Kᵀ · scale, P = softmax_rows(S), O = P V, with Q: (N, D),
K, V: (M, D). The forward streams K and V in blocks of BLOCK_N keys and keeps, per query row, the
running max m and running sum l of exp(S − m) in fp32 (online softmax), rescaling the fp32 output
accumulator whenever m grows, so the N×M matrix never exists and large logits stay finite. It
saves LSE = m + log(l) per row (base 2 inside the kernels: exp2 is what the hardware has). On
full key blocks the scale is folded into the exponent: m is taken from the raw block maximum
(max(QKᵀ)·scale·log2 e; the minimum for a negative scale) and exp2(qk·scale·log2 e − m) is one
FMA per logit; only the last, partial key block is masked (keys past M to −inf), and only its
K and V loads carry token masks. On the FMA units (float64, exact fp32) every block takes the
masked path, as before the split: with the split the sm_90 compile spilled there (float64 at head
dim 64: 144 B, exact fp32 at 32: 656 B, with the table's settings).
The backward recomputes P = exp(S − LSE) block by block:
    Δ = rowsum(dO ∘ O)                                        (preprocess kernel)
    dV = Pᵀ dO,  dS = P ∘ (dO Vᵀ − Δ),  dK = dSᵀ Q · scale,  dQ = dS K · scale
in one of two modes, chosen once per backward call:
  one-pass (the default; FlashAttention-2's): one program per (key block, head, batch) holds K and
    V, keeps dK and dV over its loop over query blocks, and adds each query block's share
    scale · dS K into a dQ sum with atomic adds: S, P and dP are computed once, 5 block products
    (S, dV, dP, dK, dQ) where separate dK/dV and dQ passes take 7. The Δ kernel writes the zeros
    the sum starts from; it is dq itself for fp32 and float64, else an fp32 (B, H, N, D) buffer
    that a last kernel casts into dq (any layout). The order of the atomic adds is the GPU's:
    dQ's last bits may differ between runs.
  deterministic (under ``torch.use_deterministic_algorithms(True)``): one launch whose first
    programs are dK/dV programs (one per key block, as above but without dQ) and whose others are
    dQ programs (one per query block, looping over key blocks), every output element written by
    exactly one program in a fixed loop order: bitwise-equal gradients across runs.
A call that wants only dQ, or only dK and dV, runs that kind of program alone (no atomics).

Addressing. A token's vector is read in place, whatever the layout. The address of feature d of
token n of head h of batch b is
    base + b·s_b + h·s_h + row(n) + col(d)
    row(n) = (n // TW)·s_r0 + (n % TW)·s_r1
    col(d) = (d // P²)·s_c0 + ((d // P) % P)·s_c1 + (d % P)·s_c2
For a (B, H, N, D) sequence tensor: TW = 1, P = 1, s_r0 = stride(N), s_c0 = stride(D). For a
(B, C, H, W) map with p×p patches: TW = W/p (patches per row), s_r0 = p·stride(H),
s_r1 = p·stride(W), s_c0 = stride(C), s_c1 = stride(H), s_c2 = stride(W), s_h = C/heads·stride(C).
That covers NCHW, channels_last, q/k/v split out of one fused QKV conv output, patches without an
im2col copy, and upstream gradients with stride 0. Where every map of a call holds its tokens in
one row (s_r0 = TW·s_r1: the pixels of NCHW and channels_last maps and their fused-qkv views), the
launchers pass TW = 1 and s_r0 = s_r1, so row(n) = n·s_r0 needs no division.

Patches are packed. A p×p patch token's features are p-wide runs one image row apart, so reading
them in place gathers a few bytes per load for every key block of every query block (O(N²·D)
bytes; no 128-bit loads in any patch kernel on sm_90). Calls with p > 1, and pixel maps whose
strides are not 16-divisible (a 45×45 NCHW map: Triton then loads nothing 16 bytes at a time, and
the kernels spilled), (``_packs``, decided once per call signature) instead copy q, k and v into
one unit-stride (3, B, heads, N, D) buffer
(``pack.py``: one launch, O(N·D) bytes, rows zero-padded to a multiple of 16 elements, the head
dim the kernels then run with), run the sequence path, and
write the output back into the map's layout (one launch); the backward packs dO (one launch),
runs the sequence backward on the packed q, k, v and out it saved, and writes dq, dk and dv where
autograd wants them (one launch: fresh maps, or the qkv gradient buffer of
``image_attention_qkv``). The kernels keep the patch addressing above (P > 1), which the public
ops no longer launch.

Limits. Head dim D ≤ 256: a block of queries and the fp32 accumulator live in registers; D is
padded to the next power of two (at least 16) with masks. Batch and heads ≤ 65535 each (grid
axes 1 and 2). At most 2^31 − 2^16 tokens per sequence: token indices are int32. fp32 inputs
run their dot products on tensor cores as 3×TF32 ("tf32x3": about fp32 accuracy), or as one tf32
product where PyTorch allows tf32 for CUDA matmuls (``torch.backends.cuda.matmul.allow_tf32`` /
``fp32_precision``), or exactly on the FMA units when the call asks ``precision="ieee"``; fp16
and bf16 accumulate in fp32; float64 computes in float64 (for gradcheck). Statistics (LSE, Δ) are
fp32 (float64 for float64 inputs). Under Triton's CPU interpreter, whose bf16 ``tl.dot`` is wrong,
bf16 operands are widened to fp32 for the dot products only (the probabilities are still rounded
to bf16 first). Logits that overflow fp32 (|scale·q·k| > 3e38) give NaN. Reverse mode only: no
forward-mode AD, no double backward (both raise).

Launch configuration. Each kernel has its own tile sizes BLOCK_M × BLOCK_N, num_warps and
num_stages, looked up in ``_LAUNCH`` (below the kernels) by kernel ("fwd", "delta", "bwd": the
one-pass backward, "dkdv" and "dq": the two kinds of program of the deterministic launch, which
takes num_warps and num_stages from "dkdv"), padded head dim BLOCK_D and dtype class (16-bit,
fp32, fp64). Where holding a tile over the loop spills (fp32 at head dim 128 and 256, float64 at
256), an entry also sets a head-dim chunk (BLOCK_DC: the held operand is read again, 16 features
at a time) and, for the one-pass and dK/dV programs, a split into a dV launch and a dK (and dQ)
one. A one-pass entry of None means no spill-free setting was found: the call takes the
deterministic launch.
``python -m benchmarks.tune`` measures candidates on a GPU; it sets them through
``_launch_override``, which only it and the tests use. Under the interpreter every kernel runs
32×32 tiles unless overridden. On a GPU the forward's table setting is adapted to the call
(``_fill_sms``): its query block is halved (down to 64 rows on tensor cores, 16 on the FMA units)
while the call would start fewer programs than the device has SMs (read once per device), down
to 16 rows per warp.
"""

import contextlib
import warnings
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import _tuned
from .pack import pack, seq_row, unpack
from ._runtime import (
    MAX_GRID_YZ,
    MAX_INDEX,
    acc_dtype,
    empty_map_like,
    on_tensor_device,
    autocast_inputs,
    check_no_forward_ad,
    check_rank,
    check_runnable,
    check_same,
    check_scale,
    check_tensor,
    channels_innermost,
    dot_dtype,
    interpreting,
    next_pow2,
    positive_int,
    check_precision,
    dot_precision,
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
    sm_count,
)

MAX_HEAD_DIM = 256
MAX_TOKENS = MAX_INDEX
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rows(n, TW, s_r0, s_r1):
    """Offset of token n (int64): tokens laid on a grid TW tokens wide.

    n < 2^31 (an int32 block index), so the division and remainder run in int32 (int64 division is
    a long emulated sequence on GPUs); the products are int64. The launchers pass TW = 1 when the
    tokens lie in one row (pixels of NCHW or channels_last maps), and Triton folds a division by 1.
    """
    return (n // TW).to(tl.int64) * s_r0 + (n % TW).to(tl.int64) * s_r1


@triton.jit
def _cols(d, P: tl.constexpr, s_c0, s_c1, s_c2):
    """Offset of feature d (int64): d = channel·P² + i·P + j inside a P×P patch."""
    d = d.to(tl.int64)
    return (d // (P * P)) * s_c0 + ((d // P) % P) * s_c1 + (d % P) * s_c2


@triton.jit
def _load_tokens(ptr, n, d, n_lim, d_lim, TW, s_r0, s_r1, P: tl.constexpr, s_c0, s_c1, s_c2, DT: tl.constexpr):
    """Load a (len(n), len(d)) tile of token vectors as dtype DT, zero outside n < n_lim, d < d_lim."""
    offs = _rows(n, TW, s_r0, s_r1)[:, None] + _cols(d, P, s_c0, s_c1, s_c2)[None, :]
    mask = (n[:, None] < n_lim) & (d[None, :] < d_lim)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(DT)


@triton.jit
def _store_tokens(ptr, val, n, d, n_lim, d_lim, TW, s_r0, s_r1, P: tl.constexpr, s_c0, s_c1, s_c2):
    offs = _rows(n, TW, s_r0, s_r1)[:, None] + _cols(d, P, s_c0, s_c1, s_c2)[None, :]
    mask = (n[:, None] < n_lim) & (d[None, :] < d_lim)
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot_chunk(acc, X, offs_x, x_lim, sx_r0, sx_r1, sx_c0, sx_c1, sx_c2, Y, offs_y, y_lim, sy_r0, sy_r1, sy_c0,
               sy_c1, sy_c2, offs_c, D, TW, P: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
               ACC: tl.constexpr):
    """acc + X·Yᵀ over the head-dim features ``offs_c``, both read here (the chunked launches)."""
    x = _load_tokens(X, offs_x, offs_c, x_lim, D, TW, sx_r0, sx_r1, P, sx_c0, sx_c1, sx_c2, DOT)
    y = _load_tokens(Y, offs_y, offs_c, y_lim, D, TW, sy_r0, sy_r1, P, sy_c0, sy_c1, sy_c2, DOT)
    return tl.dot(x, tl.trans(y), acc, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _load_block(ptr, n, d, n_lim, d_lim, TW, s_r0, s_r1, P: tl.constexpr, s_c0, s_c1, s_c2, DT: tl.constexpr,
                MASK_N: tl.constexpr, MASK_D: tl.constexpr):
    """``_load_tokens`` with only the masks a block needs: none along the tokens of a full key
    block (MASK_N False), none along the features where the head dim is a power of two ≥ 16."""
    offs = _rows(n, TW, s_r0, s_r1)[:, None] + _cols(d, P, s_c0, s_c1, s_c2)[None, :]
    if MASK_N and MASK_D:
        x = tl.load(ptr + offs, mask=(n[:, None] < n_lim) & (d[None, :] < d_lim), other=0.0)
    elif MASK_N:
        x = tl.load(ptr + offs, mask=n[:, None] < n_lim, other=0.0)
    elif MASK_D:
        x = tl.load(ptr + offs, mask=d[None, :] < d_lim, other=0.0)
    else:
        x = tl.load(ptr + offs)
    return x.to(DT)


@triton.jit
def _attn_fwd_step(
    acc, l_i, m_i, q, Q, K, V, offs_m, offs_d, start_n, N, M, D, TW,
    sq_r0, sq_r1, sq_c0, sq_c1, sq_c2, sk_r0, sk_r1, sk_c0, sk_c1, sk_c2, sv_r0, sv_r1, sv_c0, sv_c1, sv_c2,
    qk_scale, P: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
    MASKED: tl.constexpr, MASK_D: tl.constexpr, NEG: tl.constexpr,
):
    """One key block of the online softmax: (acc, l, m) updated with keys start_n .. start_n + BLOCK_N.

    MASKED: the last, partial key block (keys past M masked to −inf); every other block runs with
    no token masks, and its scale is folded into the exponent: exp2(qk·qk_scale − m) is one FMA,
    with m = max(qk)·qk_scale (min for a negative scale) taken before scaling."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if BLOCK_DC == 0:
        k = _load_block(K, offs_n, offs_d, M, D, TW, sk_r0, sk_r1, P, sk_c0, sk_c1, sk_c2, DOT, MASKED, MASK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
    else:  # as in the backward kernels: the held operand is read again a chunk at a time
        qk = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for dc in range(0, BLOCK_D, BLOCK_DC):
            offs_c = dc + tl.arange(0, BLOCK_DC)
            qk = _dot_chunk(qk, Q, offs_m, N, sq_r0, sq_r1, sq_c0, sq_c1, sq_c2, K, offs_n, M, sk_r0, sk_r1, sk_c0,
                            sk_c1, sk_c2, offs_c, D, TW, P, DOT, PRECISION, ACC)
    if MASKED:
        s = tl.where(offs_n[None, :] < M, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
    else:
        if NEG:
            m_new = tl.maximum(m_i, tl.min(qk, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_block(V, offs_n, offs_d, M, D, TW, sv_r0, sv_r1, P, sv_c0, sv_c1, sv_c2, DOT, MASKED, MASK_D)
    p = p.to(V.dtype.element_ty).to(DOT)  # rounded to the storage dtype, as on a GPU
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION, out_dtype=ACC)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O,  # token tensors, addressed as described in the header (any strides)
    LSE,  # (B, H, N) contiguous, ACC dtype: log2-sum-exp2 of the scaled logits per query row
    sq_b, sq_h, sq_r0, sq_r1, sq_c0, sq_c1, sq_c2,  # Q strides (elements): batch, head, row, col
    sk_b, sk_h, sk_r0, sk_r1, sk_c0, sk_c1, sk_c2,  # K strides
    sv_b, sv_h, sv_r0, sv_r1, sv_c0, sv_c1, sv_c2,  # V strides
    so_b, so_h, so_r0, so_r1, so_c0, so_c1, so_c2,  # O strides
    N, M, D,  # queries, keys, head dim (unpadded)
    TW,  # tokens per row of the token grid (W/p for maps, 1 for sequences)
    NH,  # number of heads
    qk_scale: tl.float64,  # softmax scale · log2(e)
    P: tl.constexpr,  # patch size (1 for pixels and sequences)
    ACC: tl.constexpr,  # accumulator dtype: fp32 (fp64 for fp64 inputs)
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands: "tf32x3", "tf32" or "ieee"
    DOT: tl.constexpr,  # tl.dot operand dtype: the input dtype (fp32 for bf16 under the interpreter)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DC: tl.constexpr = 0,  # 0: hold Q; else S summed over head-dim chunks this wide, Q read again
    MASK_D: tl.constexpr = True,  # False where D = BLOCK_D: no feature masks on K and V
    NEG: tl.constexpr = False,  # the scale is negative: the running max of the scaled logits is min(qk)·scale
    SPLIT_LAST: tl.constexpr = True,  # full key blocks unmasked, the last one masked; False: all masked
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    if ACC != tl.float64:  # fp32 kernels convert the fp64 scalar once; float64 ones keep every bit
        qk_scale = tl.cast(qk_scale, ACC)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    O += b * so_b + h * so_h

    if BLOCK_DC == 0:
        q = _load_tokens(Q, offs_m, offs_d, N, D, TW, sq_r0, sq_r1, P, sq_c0, sq_c1, sq_c2, DOT)
    else:
        q = tl.zeros([BLOCK_M, 16], dtype=DOT)  # unused: S is summed over chunks read in the step
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    if SPLIT_LAST:  # keys in full blocks, with no token masks; the rest in one masked block
        full = M - M % BLOCK_N
        for start_n in range(0, full, BLOCK_N):
            acc, l_i, m_i = _attn_fwd_step(
                acc, l_i, m_i, q, Q, K, V, offs_m, offs_d, start_n, N, M, D, TW,
                sq_r0, sq_r1, sq_c0, sq_c1, sq_c2, sk_r0, sk_r1, sk_c0, sk_c1, sk_c2, sv_r0, sv_r1, sv_c0, sv_c1,
                sv_c2, qk_scale, P, ACC, PRECISION, DOT, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DC, False, MASK_D, NEG)
        if full < M:
            acc, l_i, m_i = _attn_fwd_step(
                acc, l_i, m_i, q, Q, K, V, offs_m, offs_d, full, N, M, D, TW,
                sq_r0, sq_r1, sq_c0, sq_c1, sq_c2, sk_r0, sk_r1, sk_c0, sk_c1, sk_c2, sv_r0, sv_r1, sv_c0, sv_c1,
                sv_c2, qk_scale, P, ACC, PRECISION, DOT, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DC, True, True, NEG)
    else:  # every block masked (one loop, as before the split)
        for start_n in range(0, M, BLOCK_N):
            acc, l_i, m_i = _attn_fwd_step(
                acc, l_i, m_i, q, Q, K, V, offs_m, offs_d, start_n, N, M, D, TW,
                sq_r0, sq_r1, sq_c0, sq_c1, sq_c2, sk_r0, sk_r1, sk_c0, sk_c1, sk_c2, sv_r0, sv_r1, sv_c0, sv_c1,
                sv_c2, qk_scale, P, ACC, PRECISION, DOT, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DC, True, True, NEG)
    acc = acc / l_i[:, None]
    _store_tokens(O, acc, offs_m, offs_d, N, D, TW, so_r0, so_r1, P, so_c0, so_c1, so_c2)
    row = (b * NH + h) * N + offs_m
    tl.store(LSE + row, m_i + tl.log2(l_i), mask=offs_m < N)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO,  # forward output and its upstream gradient (token tensors, any strides)
    DELTA,  # (B, H, N) contiguous, ACC dtype: rowsum(dO ∘ O)
    DQ,  # the one-pass backward's dQ accumulator (token addressing), zeroed here where ZERO_DQ
    so_b, so_h, so_r0, so_r1, so_c0, so_c1, so_c2,
    sdo_b, sdo_h, sdo_r0, sdo_r1, sdo_c0, sdo_c1, sdo_c2,
    sdq_b, sdq_h, sdq_r0, sdq_r1, sdq_c0, sdq_c1, sdq_c2,
    N, D, TW, NH,
    P: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ZERO_DQ: tl.constexpr = False,  # write the zeros the one-pass backward's atomic dQ sums start from
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    O += b * so_b + h * so_h
    DO += b * sdo_b + h * sdo_h
    o = _load_tokens(O, offs_m, offs_d, N, D, TW, so_r0, so_r1, P, so_c0, so_c1, so_c2, ACC)
    do = _load_tokens(DO, offs_m, offs_d, N, D, TW, sdo_r0, sdo_r1, P, sdo_c0, sdo_c1, sdo_c2, ACC)
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + (b * NH + h) * N + offs_m, delta, mask=offs_m < N)
    if ZERO_DQ:
        _store_tokens(DQ + b * sdq_b + h * sdq_h, tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC), offs_m, offs_d, N, D, TW,
                      sdq_r0, sdq_r1, P, sdq_c0, sdq_c1, sdq_c2)


@triton.jit
def _add_tokens(ptr, val, n, d, n_lim, d_lim, TW, s_r0, s_r1, P: tl.constexpr, s_c0, s_c1, s_c2,
                TRANS: tl.constexpr):
    """Atomically add a (len(n), len(d)) tile, or with TRANS a (len(d), len(n)) one, into token
    vectors (the one-pass backward's dQ)."""
    if TRANS:
        offs = _rows(n, TW, s_r0, s_r1)[None, :] + _cols(d, P, s_c0, s_c1, s_c2)[:, None]
        mask = (n[None, :] < n_lim) & (d[:, None] < d_lim)
    else:
        offs = _rows(n, TW, s_r0, s_r1)[:, None] + _cols(d, P, s_c0, s_c1, s_c2)[None, :]
        mask = (n[:, None] < n_lim) & (d[None, :] < d_lim)
    tl.atomic_add(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask, sem="relaxed")


@triton.jit
def _bwd_kv_program(
    pid_n, h, b,  # key block, head, batch of this program
    Q, K, V, DO, DK, DV, DQ, LSE, DELTA,  # as in the kernels below
    sq_b, sq_h, sq_r0, sq_r1, sq_c0, sq_c1, sq_c2,
    sk_b, sk_h, sk_r0, sk_r1, sk_c0, sk_c1, sk_c2,
    sv_b, sv_h, sv_r0, sv_r1, sv_c0, sv_c1, sv_c2,
    sdo_b, sdo_h, sdo_r0, sdo_r1, sdo_c0, sdo_c1, sdo_c2,
    sdk_b, sdk_h, sdk_r0, sdk_r1, sdk_c0, sdk_c1, sdk_c2,
    sdv_b, sdv_h, sdv_r0, sdv_r1, sdv_c0, sdv_c1, sdv_c2,
    sdq_b, sdq_h, sdq_r0, sdq_r1, sdq_c0, sdq_c1, sdq_c2,
    N, M, D, TW, NH, scale, qk_scale,
    P: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
    PART: tl.constexpr, ATOMIC_DQ: tl.constexpr, DQ_CHUNK: tl.constexpr, DQ_T: tl.constexpr,
):
    """One key block: dK and dV held over the loop over query blocks (PART 0; 1: dV only; 2: dK
    only), and with ATOMIC_DQ each query block's dQ share scale·dS K added into DQ atomically."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    DO += b * sdo_b + h * sdo_h
    DQ += b * sdq_b + h * sdq_h
    stats = (b * NH + h) * N

    if BLOCK_DC == 0:
        k = _load_tokens(K, offs_n, offs_d, M, D, TW, sk_r0, sk_r1, P, sk_c0, sk_c1, sk_c2, DOT)
        if PART != 1:
            v = _load_tokens(V, offs_n, offs_d, M, D, TW, sv_r0, sv_r1, P, sv_c0, sv_c1, sv_c2, DOT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        # rows past N get LSE = +inf, hence P = 0: they add nothing
        lse = tl.load(LSE + stats + offs_m, mask=offs_m < N, other=float("inf"))
        delta = tl.load(DELTA + stats + offs_m, mask=offs_m < N, other=0.0)
        if BLOCK_DC == 0:
            q = _load_tokens(Q, offs_m, offs_d, N, D, TW, sq_r0, sq_r1, P, sq_c0, sq_c1, sq_c2, DOT)
            do = _load_tokens(DO, offs_m, offs_d, N, D, TW, sdo_r0, sdo_r1, P, sdo_c0, sdo_c1, sdo_c2, DOT)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION, out_dtype=ACC)  # (BLOCK_N, BLOCK_M)
        else:
            # K and V are read again, a chunk of the head dim at a time, for every query block:
            # held whole, their shared-memory tiles stay live over the loop, and with them one
            # wgmma descriptor per 8-deep step of the head dim, in registers (fp32 at head dim 128)
            s_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
            dp_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
            for dc in range(0, BLOCK_D, BLOCK_DC):
                offs_c = dc + tl.arange(0, BLOCK_DC)
                s_t = _dot_chunk(s_t, K, offs_n, M, sk_r0, sk_r1, sk_c0, sk_c1, sk_c2, Q, offs_m, N, sq_r0, sq_r1,
                                 sq_c0, sq_c1, sq_c2, offs_c, D, TW, P, DOT, PRECISION, ACC)
                if PART != 1:
                    dp_t = _dot_chunk(dp_t, V, offs_n, M, sv_r0, sv_r1, sv_c0, sv_c1, sv_c2, DO, offs_m, N, sdo_r0,
                                      sdo_r1, sdo_c0, sdo_c1, sdo_c2, offs_c, D, TW, P, DOT, PRECISION, ACC)
            q = _load_tokens(Q, offs_m, offs_d, N, D, TW, sq_r0, sq_r1, P, sq_c0, sq_c1, sq_c2, DOT)
            do = _load_tokens(DO, offs_m, offs_d, N, D, TW, sdo_r0, sdo_r1, P, sdo_c0, sdo_c1, sdo_c2, DOT)
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        if PART != 2:
            dv += tl.dot(p_t.to(DO.dtype.element_ty).to(DOT), do, input_precision=PRECISION, out_dtype=ACC)
        if PART != 1:
            if BLOCK_DC == 0:
                dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION, out_dtype=ACC)
            ds_t = (p_t * (dp_t - delta[None, :])).to(Q.dtype.element_ty).to(DOT)
            dk += tl.dot(ds_t, q, input_precision=PRECISION, out_dtype=ACC)
            if ATOMIC_DQ:  # this key block's share of dQ for these queries: scale · dS K
                # as (dSᵀ)ᵀ K, or with DQ_T transposed, Kᵀ dSᵀ: the head dim as the rows where
                # BLOCK_M is too few for a wgmma's 64; added into DQ as a (features, queries) tile
                if BLOCK_DC == 0:
                    if not DQ_T:
                        dq = tl.dot(tl.trans(ds_t), k, input_precision=PRECISION, out_dtype=ACC) * scale
                    else:
                        dq = tl.dot(tl.trans(k), ds_t, input_precision=PRECISION, out_dtype=ACC) * scale
                    _add_tokens(DQ, dq, offs_m, offs_d, N, D, TW, sdq_r0, sdq_r1, P, sdq_c0, sdq_c1, sdq_c2, DQ_T)
                else:  # K read again a chunk at a time (at least 64 features: a wgmma's rows)
                    for dc in range(0, BLOCK_D, DQ_CHUNK):
                        offs_c = dc + tl.arange(0, DQ_CHUNK)
                        k_c = _load_tokens(K, offs_n, offs_c, M, D, TW, sk_r0, sk_r1, P, sk_c0, sk_c1, sk_c2, DOT)
                        if not DQ_T:
                            dq = tl.dot(tl.trans(ds_t), k_c, input_precision=PRECISION, out_dtype=ACC) * scale
                        else:
                            dq = tl.dot(tl.trans(k_c), ds_t, input_precision=PRECISION, out_dtype=ACC) * scale
                        _add_tokens(DQ, dq, offs_m, offs_c, N, D, TW, sdq_r0, sdq_r1, P, sdq_c0, sdq_c1, sdq_c2,
                                    DQ_T)
    if PART != 1:
        dk = dk * scale
        _store_tokens(DK + b * sdk_b + h * sdk_h, dk, offs_n, offs_d, M, D, TW, sdk_r0, sdk_r1, P, sdk_c0, sdk_c1,
                      sdk_c2)
    if PART != 2:
        _store_tokens(DV + b * sdv_b + h * sdv_h, dv, offs_n, offs_d, M, D, TW, sdv_r0, sdv_r1, P, sdv_c0, sdv_c1,
                      sdv_c2)


@triton.jit
def _bwd_q_program(
    pid_m, h, b,  # query block, head, batch of this program
    Q, K, V, DO, DQ, LSE, DELTA,
    sq_b, sq_h, sq_r0, sq_r1, sq_c0, sq_c1, sq_c2,
    sk_b, sk_h, sk_r0, sk_r1, sk_c0, sk_c1, sk_c2,
    sv_b, sv_h, sv_r0, sv_r1, sv_c0, sv_c1, sv_c2,
    sdo_b, sdo_h, sdo_r0, sdo_r1, sdo_c0, sdo_c1, sdo_c2,
    sdq_b, sdq_h, sdq_r0, sdq_r1, sdq_c0, sdq_c1, sdq_c2,
    N, M, D, TW, NH, scale, qk_scale,
    P: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
):
    """One query block: dQ held over the loop over key blocks (BLOCK_DC 0: Q and dO held whole;
    else S and dP summed over head-dim chunks this wide), stored once."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    stats = (b * NH + h) * N

    Q += b * sq_b + h * sq_h
    DO += b * sdo_b + h * sdo_h
    if BLOCK_DC == 0:
        q = _load_tokens(Q, offs_m, offs_d, N, D, TW, sq_r0, sq_r1, P, sq_c0, sq_c1, sq_c2, DOT)
        do = _load_tokens(DO, offs_m, offs_d, N, D, TW, sdo_r0, sdo_r1, P, sdo_c0, sdo_c1, sdo_c2, DOT)
    lse = tl.load(LSE + stats + offs_m, mask=offs_m < N, other=float("inf"))
    delta = tl.load(DELTA + stats + offs_m, mask=offs_m < N, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if BLOCK_DC == 0:
            k = _load_tokens(K, offs_n, offs_d, M, D, TW, sk_r0, sk_r1, P, sk_c0, sk_c1, sk_c2, DOT)
            v = _load_tokens(V, offs_n, offs_d, M, D, TW, sv_r0, sv_r1, P, sv_c0, sv_c1, sv_c2, DOT)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
        else:  # Q and dO read again a chunk at a time, as K and V in the dK/dV programs
            s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            for dc in range(0, BLOCK_D, BLOCK_DC):
                offs_c = dc + tl.arange(0, BLOCK_DC)
                s = _dot_chunk(s, Q, offs_m, N, sq_r0, sq_r1, sq_c0, sq_c1, sq_c2, K, offs_n, M, sk_r0, sk_r1, sk_c0,
                               sk_c1, sk_c2, offs_c, D, TW, P, DOT, PRECISION, ACC)
                dp = _dot_chunk(dp, DO, offs_m, N, sdo_r0, sdo_r1, sdo_c0, sdo_c1, sdo_c2, V, offs_n, M, sv_r0, sv_r1,
                                sv_c0, sv_c1, sv_c2, offs_c, D, TW, P, DOT, PRECISION, ACC)
            k = _load_tokens(K, offs_n, offs_d, M, D, TW, sk_r0, sk_r1, P, sk_c0, sk_c1, sk_c2, DOT)
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = tl.where(offs_n[None, :] < M, p, 0.0)
        if BLOCK_DC == 0:
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(K.dtype.element_ty).to(DOT), k, input_precision=PRECISION, out_dtype=ACC)
    dq = dq * scale
    _store_tokens(DQ + b * sdq_b + h * sdq_h, dq, offs_m, offs_d, N, D, TW, sdq_r0, sdq_r1, P, sdq_c0, sdq_c1, sdq_c2)


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, DO,  # inputs and upstream gradient (token tensors, any strides)
    DK, DV,  # gradients of K and V (token tensors, any strides)
    DQ,  # dQ accumulator, zeroed by the Δ kernel: dq itself (fp32, fp64) or an fp32 (B, H, N, D) buffer
    LSE, DELTA,  # (B, H, N) contiguous ACC statistics from forward and preprocess
    sq_b, sq_h, sq_r0, sq_r1, sq_c0, sq_c1, sq_c2,
    sk_b, sk_h, sk_r0, sk_r1, sk_c0, sk_c1, sk_c2,
    sv_b, sv_h, sv_r0, sv_r1, sv_c0, sv_c1, sv_c2,
    sdo_b, sdo_h, sdo_r0, sdo_r1, sdo_c0, sdo_c1, sdo_c2,
    sdk_b, sdk_h, sdk_r0, sdk_r1, sdk_c0, sdk_c1, sdk_c2,
    sdv_b, sdv_h, sdv_r0, sdv_r1, sdv_c0, sdv_c1, sdv_c2,
    sdq_b, sdq_h, sdq_r0, sdq_r1, sdq_c0, sdq_c1, sdq_c2,  # DQ strides (the accumulator's)
    N, M, D, TW, NH,
    scale: tl.float64,  # softmax scale (dK = scale · dSᵀ Q, dQ = scale · dS K)
    qk_scale: tl.float64,  # scale · log2(e)
    P: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DC: tl.constexpr = 0,  # 0: hold K and V; else Sᵀ and dPᵀ summed over head-dim chunks this wide
    PART: tl.constexpr = 0,  # 0: dK, dV and dQ; 1: dV only; 2: dK and dQ (the two halves of a split launch)
    DQ_CHUNK: tl.constexpr = 64,  # with BLOCK_DC: the head-dim chunk of the dQ product (K read again)
    DQ_T: tl.constexpr = False,  # the dQ product transposed (Kᵀ dSᵀ: head dim × queries)
):
    """The one-pass backward: one program per (key block, head, batch), dQ summed with atomics."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    if ACC != tl.float64:  # fp32 kernels convert the fp64 scalars once; float64 ones keep every bit
        scale = tl.cast(scale, ACC)
        qk_scale = tl.cast(qk_scale, ACC)
    _bwd_kv_program(tl.program_id(0), h, b, Q, K, V, DO, DK, DV, DQ, LSE, DELTA,
                    sq_b, sq_h, sq_r0, sq_r1, sq_c0, sq_c1, sq_c2, sk_b, sk_h, sk_r0, sk_r1, sk_c0, sk_c1, sk_c2,
                    sv_b, sv_h, sv_r0, sv_r1, sv_c0, sv_c1, sv_c2, sdo_b, sdo_h, sdo_r0, sdo_r1, sdo_c0, sdo_c1, sdo_c2,
                    sdk_b, sdk_h, sdk_r0, sdk_r1, sdk_c0, sdk_c1, sdk_c2, sdv_b, sdv_h, sdv_r0, sdv_r1, sdv_c0, sdv_c1,
                    sdv_c2, sdq_b, sdq_h, sdq_r0, sdq_r1, sdq_c0, sdq_c1, sdq_c2,
                    N, M, D, TW, NH, scale, qk_scale, P, ACC, PRECISION, DOT, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DC,
                    PART, True, DQ_CHUNK, DQ_T)


@triton.jit
def _attn_bwd_det_kernel(
    Q, K, V, DO, DK, DV,  # as in _attn_bwd_kernel
    DQ,  # gradient of Q (token tensor, any strides), written once per element
    LSE, DELTA,
    sq_b, sq_h, sq_r0, sq_r1, sq_c0, sq_c1, sq_c2,
    sk_b, sk_h, sk_r0, sk_r1, sk_c0, sk_c1, sk_c2,
    sv_b, sv_h, sv_r0, sv_r1, sv_c0, sv_c1, sv_c2,
    sdo_b, sdo_h, sdo_r0, sdo_r1, sdo_c0, sdo_c1, sdo_c2,
    sdk_b, sdk_h, sdk_r0, sdk_r1, sdk_c0, sdk_c1, sdk_c2,
    sdv_b, sdv_h, sdv_r0, sdv_r1, sdv_c0, sdv_c1, sdv_c2,
    sdq_b, sdq_h, sdq_r0, sdq_r1, sdq_c0, sdq_c1, sdq_c2,
    N, M, D, TW, NH,
    scale: tl.float64, qk_scale: tl.float64,  # as in _attn_bwd_kernel
    KV_PROGRAMS,  # with PROGRAMS 0: programs below this index are dK/dV programs, the rest dQ programs
    P: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,  # the dK/dV programs' tiles
    BLOCK_DC: tl.constexpr = 0,  # the dK/dV programs' head-dim chunk (0: K and V held whole)
    PART: tl.constexpr = 0,  # the dK/dV programs' part: 0 dK and dV; 1 dV only; 2 dK only
    BLOCK_M2: tl.constexpr = 16, BLOCK_N2: tl.constexpr = 16,  # the dQ programs' tiles
    BLOCK_DC2: tl.constexpr = 0,  # the dQ programs' head-dim chunk (0: Q and dO held whole)
    PROGRAMS: tl.constexpr = 0,  # 0: dK/dV programs, then dQ programs; 1: dK/dV programs only; 2: dQ only
):
    """The deterministic backward: dK/dV programs (one per key block) and dQ programs (one per
    query block) in one grid, every gradient element written by one program, no atomics."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    if ACC != tl.float64:
        scale = tl.cast(scale, ACC)
        qk_scale = tl.cast(qk_scale, ACC)
    if PROGRAMS != 2:  # a dK/dV program
        if pid < KV_PROGRAMS:
            _bwd_kv_program(
                pid, h, b, Q, K, V, DO, DK, DV, DQ, LSE, DELTA,
                sq_b, sq_h, sq_r0, sq_r1, sq_c0, sq_c1, sq_c2, sk_b, sk_h, sk_r0, sk_r1, sk_c0, sk_c1, sk_c2,
                sv_b, sv_h, sv_r0, sv_r1, sv_c0, sv_c1, sv_c2, sdo_b, sdo_h, sdo_r0, sdo_r1, sdo_c0, sdo_c1, sdo_c2,
                sdk_b, sdk_h, sdk_r0, sdk_r1, sdk_c0, sdk_c1, sdk_c2, sdv_b, sdv_h, sdv_r0, sdv_r1, sdv_c0, sdv_c1,
                sdv_c2, sdq_b, sdq_h, sdq_r0, sdq_r1, sdq_c0, sdq_c1, sdq_c2,
                N, M, D, TW, NH, scale, qk_scale, P, ACC, PRECISION, DOT, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DC,
                PART, False, BLOCK_DC, False)
    if PROGRAMS != 1:  # a dQ program
        if pid >= KV_PROGRAMS:
            _bwd_q_program(
                pid - KV_PROGRAMS, h, b, Q, K, V, DO, DQ, LSE, DELTA,
                sq_b, sq_h, sq_r0, sq_r1, sq_c0, sq_c1, sq_c2, sk_b, sk_h, sk_r0, sk_r1, sk_c0, sk_c1, sk_c2,
                sv_b, sv_h, sv_r0, sv_r1, sv_c0, sv_c1, sv_c2, sdo_b, sdo_h, sdo_r0, sdo_r1, sdo_c0, sdo_c1, sdo_c2,
                sdq_b, sdq_h, sdq_r0, sdq_r1, sdq_c0, sdq_c1, sdq_c2,
                N, M, D, TW, NH, scale, qk_scale, P, ACC, PRECISION, DOT, BLOCK_M2, BLOCK_N2, BLOCK_D, BLOCK_DC2)


@triton.jit
def _attn_bwd_dq_cast_kernel(
    ACCUM,  # fp32 dQ accumulator (token addressing with the strides sa_*), already scaled
    DQ,  # gradient of Q (token tensor, any strides, 16-bit)
    sa_b, sa_h, sa_r0, sa_r1, sa_c0, sa_c1, sa_c2,
    sdq_b, sdq_h, sdq_r0, sdq_r1, sdq_c0, sdq_c1, sdq_c2,
    N, D, TW,
    P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ = the one-pass backward's fp32 sums, cast to dq's dtype and stored in dq's layout."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    acc = _load_tokens(ACCUM + b * sa_b + h * sa_h, offs_m, offs_d, N, D, TW, sa_r0, sa_r1, P, sa_c0, sa_c1, sa_c2,
                       tl.float32)
    _store_tokens(DQ + b * sdq_b + h * sdq_h, acc, offs_m, offs_d, N, D, TW, sdq_r0, sdq_r1, P, sdq_c0, sdq_c1, sdq_c2)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


class _Tokens:
    """How the kernels address one family of token tensors (all sequences, or all maps of a call).

    ``strides(t)`` turns a tensor of that family into the 7 element strides the kernels take:
    batch, head, row0, row1, col0, col1, col2 (see the file header).
    """

    def __init__(self, kind: str, heads: int, patch: int, width: int, flat: bool = False):
        self.kind, self.heads, self.patch, self.width, self.flat = kind, heads, patch, width, flat
        self.tw = 1 if kind == "seq" or flat else width // patch

    def strides(self, t: torch.Tensor):
        if self.kind == "seq":
            s_b, s_h, s_n, s_d = t.stride()
            return (s_b, s_h, s_n, 0, s_d, 0, 0)
        s_b, s_c, s_y, s_x = t.stride()
        p = self.patch
        if self.flat:  # token n at n·(p·s_x): one row of tokens
            return (s_b, (t.shape[1] // self.heads) * s_c, p * s_x, 0, s_c, s_y, s_x)
        return (s_b, (t.shape[1] // self.heads) * s_c, p * s_y, p * s_x, s_c, s_y, s_x)

    def for_tensors(self, *tensors: torch.Tensor) -> "_Tokens":
        """This layout, read as one row of tokens (TW = 1: no division per token in the kernels)
        when every map of the call has row stride = TW × token stride, as the pixels (p = 1) of
        NCHW and channels_last maps, their fused-qkv views and stride-0 gradients do; else itself."""
        if self.kind == "seq" or self.flat:
            return self
        for t in tensors:
            if t.dim() == 4 and t.numel() > 0:
                _, _, s_r0, s_r1, *_ = self.strides(t)
                if s_r0 != self.tw * s_r1:
                    return self
        return _Tokens(self.kind, self.heads, self.patch, self.width, flat=True)

    def empty_like(self, t: torch.Tensor) -> torch.Tensor:
        """A fresh output for ``t``: maps keep channels_last when ``t`` has channels innermost."""
        return poison(empty_map_like(t) if self.kind == "map" else torch.empty(t.shape, dtype=t.dtype, device=t.device))


class _Launch(NamedTuple):
    """One kernel's launch configuration."""

    block_m: int  # query rows per tile (the Δ kernel's rows per program)
    block_n: Optional[int]  # key rows per tile; None for the Δ kernel (no key blocks)
    num_warps: int
    num_stages: Optional[int]  # pipelining depth of the loop over the other sequence; None for Δ (no loop)
    # 0, or the head-dim chunk (BLOCK_DC) over which S (and dP) are summed, their operands read
    # again for every block instead of held over the loop (see the kernels); where holding spills
    chunk: int = 0
    split: bool = False  # dK/dV only: dV and dK in two launches, each with one accumulator


_KERNELS = ("fwd", "delta", "bwd", "dkdv", "dq")
_DTYPE_CLASSES = ("16bit", "fp32", "fp64")
_LAUNCH_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "BLOCK_DC", "SPLIT")

# (kernel, BLOCK_D, dtype class) -> launch configuration on a GPU.
#   kernel: "fwd" (_attn_fwd_kernel), "delta" (_attn_bwd_delta_kernel), "dkdv"
#     (_attn_bwd_dkdv_kernel: one program per BLOCK_N keys, looping over BLOCK_M query blocks) or
#     "dq" (_attn_bwd_dq_kernel: one program per BLOCK_M queries, looping over BLOCK_N key blocks);
#   BLOCK_D: the head dim padded to a power of two, 16 to 256;
#   dtype class: "16bit" (fp16 and bf16), "fp32", "fp64": the bytes per element of the tiles that
#     the dot products stage through shared memory.
# Constraints: BLOCK_M and BLOCK_N are powers of two >= 16 (tl.dot needs 16 rows); the tiles the
# loop streams, num_stages deep, must fit in shared memory; the accumulators live in registers.
# How the entries were chosen (triton 3.9, `python -m attnsr.kernels.compile_report`, its
# `check_config` on a fused-qkv NCHW map, bf16 for "16bit", fp32 at PyTorch's default precision,
# i.e. 3×TF32, for "fp32"): candidates in order, starting from Hopper anchors (PyTorch
# FlexAttention's H100 defaults: bf16 fwd d64 128×128/4/3, d128 128×64/8/3, d256 64×32/4/3; fp32
# fwd d64 128×32/4/3, d128 32×64/4/3), then smaller tiles; the first that compiles for sm_90 with
# no spills and, up to head dim 128 outside fp64, on wgmma (HGMMA, no HMMA), preferring one that
# also does not spill on sm_80 and fits its 163 KiB. The comment above each entry gives its sm_90
# figures (registers per thread, shared memory, HGMMA / HMMA count, or FMA for no tensor cores)
# and sm_80's where they were compiled, with triton 3.6's where it differs. Where every setting
# that holds the loop-invariant operand whole spilled (fp32 3×TF32 at head dim 128 in the backward,
# 256 everywhere; float64 at 256), the entry sets ``chunk`` (S and dP summed over 16-wide chunks of
# the head dim, their operands read again per block) and, for dK/dV, ``split`` (dV and dK in two
# launches): spill-free under 3.9 and 3.6, at the cost of re-reading the held tiles from L2 and, when
# split, computing S twice. Why holding spills: 3×TF32 keeps the held tile and its tf32 hi / lo
# halves in shared memory for the whole loop, and the wgmma descriptors of its 8-deep steps along
# the head dim (16 per operand at head dim 128) are hoisted out of the loop into registers.
# The Δ kernel's 16-bit and fp32 entries are the rule the kernels were written with (no dot
# products; no spills in the report). Timings on a GPU may still move entries
# (`python -m benchmarks.tune`, which only proposes candidates that pass this gate).
_LAUNCH = {
    # forward
    # sm_90: 248 regs, no spills, 28 KiB, 18 HGMMA; sm_80 188 regs, 16 KiB
    ("fwd", 16, "16bit"): _Launch(128, 128, 4, 3),
    # sm_90: 167 regs, no spills, 28 KiB, 36 HGMMA; sm_80 168 regs, 24 KiB
    ("fwd", 16, "fp32"): _Launch(128, 32, 4, 3),
    # sm_90: 194 regs, no spills, 24 KiB, FMA
    ("fwd", 16, "fp64"): _Launch(64, 64, 4, 2),
    # sm_90: 166 regs, no spills, 32 KiB, 12 HGMMA; sm_80 182 regs, 20 KiB
    ("fwd", 32, "16bit"): _Launch(128, 64, 4, 3),
    # sm_90: 163 regs, no spills, 64 KiB, 36 HGMMA; sm_80 255 regs, 48 KiB
    ("fwd", 32, "fp32"): _Launch(128, 64, 8, 2),
    # sm_90: 136 regs, no spills, 24 KiB, FMA (triton 3.6: 136; exact fp32 at head dim 30: 96 / 90).
    # 64×32/4/2 spilled 16 B (3.9) with this forward (the step in its own function, alpha after p)
    ("fwd", 32, "fp64"): _Launch(64, 16, 4, 2),
    # sm_90 (the forward with its last key block split off): 221 regs, 16 HGMMA on a fused map;
    # 45×45 NCHW maps (H·W not 16-divisible) spilled 560 B at 128×64/4/3 (304 B before the split),
    # 248 B at 64×64/4/3, 40 B at 128×32/4/3; 128×64/8/3 there: 246 regs, no spills, 16 HGMMA
    ("fwd", 64, "16bit"): _Launch(128, 64, 8, 3),
    # sm_90: 188 regs, no spills, 80 KiB, 36 HGMMA; sm_80 255 regs, 64 KiB
    ("fwd", 64, "fp32"): _Launch(64, 32, 4, 3),
    # sm_90: 196 regs, no spills, 56 KiB, FMA
    ("fwd", 64, "fp64"): _Launch(32, 32, 4, 2),
    # 45×45 NCHW maps spilled 272 B at 128×64/8/3 (200 B before the split), 1200 B at 64×64/4/3;
    # 128×32/8/3 there: 228 regs, no spills, 20 HGMMA
    ("fwd", 128, "16bit"): _Launch(128, 32, 8, 3),
    # 45×45 NCHW maps (H·W not 16-divisible), sm_90: 247 regs, no spills, 16 KiB, 24 HGMMA (triton
    # 3.6: 248). Two stages (64×16/4/2, chunked) spilled 80 B there (3.6: 104 B; 24 B before the last
    # key block was split off), 64×32/4/1 40 B, Q held whole (64×16/4/2 unchunked) 696 B
    ("fwd", 128, "fp32"): _Launch(64, 16, 4, 1, chunk=16),
    # sequences whose length is not 16-divisible (packed 45×45 maps, 23×23 patch tokens) spilled 8 B
    # at 16×32/4/1 under triton 3.6 (168 regs); 16×32/8/1 there: 140 [122 under 3.9] regs, FMA
    ("fwd", 128, "fp64"): _Launch(16, 32, 8, 1),
    # sm_90: 222 regs, no spills, 40 KiB, 17 HGMMA; sm_80 255 regs, 42 KiB
    ("fwd", 256, "16bit"): _Launch(64, 16, 4, 1),
    # 45×45 NCHW maps, sm_90: 240 regs, no spills, 120 HMMA; 32×32/8/1 chunked spilled 64 B there
    # (3.6: 40 B; 8 B before the last key block was split off), 64×16/4/1 chunked 1048 B. Q held
    # whole, every setting spilled (16×16/4/1: 208 B)
    ("fwd", 256, "fp32"): _Launch(32, 16, 8, 1, chunk=16),
    # sm_90: 123 regs, no spills, 34 KiB, FMA (triton 3.6: 162 regs). Unchunked it spilled 16 B under 3.6
    ("fwd", 256, "fp64"): _Launch(16, 16, 8, 1, chunk=16),
    # Δ = rowsum(dO ∘ O): rows per program and warps only; no dot products, no spills
    ("delta", 16, "16bit"): _Launch(64, None, 4, None),
    ("delta", 16, "fp32"): _Launch(64, None, 4, None),
    # sm_90: 32 regs, no spills, 2 KiB, FMA
    ("delta", 16, "fp64"): _Launch(64, None, 4, None),
    ("delta", 32, "16bit"): _Launch(64, None, 4, None),
    ("delta", 32, "fp32"): _Launch(64, None, 4, None),
    # sm_90: 48 regs, no spills, 2 KiB, FMA
    ("delta", 32, "fp64"): _Launch(64, None, 4, None),
    ("delta", 64, "16bit"): _Launch(64, None, 4, None),
    ("delta", 64, "fp32"): _Launch(64, None, 4, None),
    # sm_90: 128 regs, no spills, 2 KiB, FMA
    ("delta", 64, "fp64"): _Launch(64, None, 4, None),
    ("delta", 128, "16bit"): _Launch(64, None, 8, None),
    ("delta", 128, "fp32"): _Launch(32, None, 8, None),
    # sm_90: 126 [76] regs, no spills, 1 KiB, FMA. 64 rows (254 regs before) spill 24 B (triton 3.9) once Δ
    # also zeroes the one-pass backward's dQ sums
    ("delta", 128, "fp64"): _Launch(32, None, 4, None),
    ("delta", 256, "16bit"): _Launch(32, None, 8, None),
    ("delta", 256, "fp32"): _Launch(32, None, 8, None),
    # sm_90: 254 regs, no spills, 1 KiB, FMA
    ("delta", 256, "fp64"): _Launch(32, None, 4, None),
    # one-pass backward (dK, dV and atomic dQ; None: no spill-free setting found, such calls take the
    # deterministic launch). Figures: sm_90, triton 3.9 [3.6 where it differs], on the report's
    # 16×16 maps; chosen as the entries above, starting from the dK/dV entry. Not yet clean on a
    # 45×45 map (strides not divisible by 16; triton 3.9): 16-bit D128 176 B, fp32 D64 88 B, the
    # dK+dQ half at fp32 D16 32 B; the deterministic launch at fp32 D64 56 B; Δ at 16-bit D64 8 B
    # (32 B with the zeroing of the dQ sums; 64 rows with 8 warps: none). With fewer than 64 queries
    # a tile (BLOCK_M) the dQ product runs transposed (Kᵀ dSᵀ, the head dim as a wgmma's rows): else
    # it falls to mma.sync
    # 142 [154] regs, no spills, 32 KiB, 18 HGMMA
    ("bwd", 16, "16bit"): _Launch(64, 128, 8, 2),
    # split: dV 122 [136] / dK+dQ 241 [255] regs, no spills, 16 / 56 KiB, 30 / 60 HGMMA. In one launch
    # 64×64/4/2 spilled 232 B, 64×64/4/1 120 B
    ("bwd", 16, "fp32"): _Launch(64, 64, 4, 1, split=True),
    # 236 [238] regs, no spills, 48 [44] KiB, FMA
    ("bwd", 16, "fp64"): _Launch(32, 64, 4, 2),
    # 173 [177] regs, no spills, 48 KiB, 20 HGMMA
    ("bwd", 32, "16bit"): _Launch(64, 128, 8, 2),
    # 64×64/4/1 split (the D = 16 entry): 3.9 146 / 255 regs, no spills, but 24 B under 3.6; 64×64/4/2
    # split 176 B (3.9)
    ("bwd", 32, "fp32"): None,
    # 168 [184] regs, no spills, 36 KiB, FMA
    ("bwd", 32, "fp64"): _Launch(16, 32, 4, 2),
    # 164 [164] regs, no spills, 56 KiB, 20 HGMMA; 2×2 patches: 254 [254] regs, no spills, 44 [40] KiB
    ("bwd", 64, "16bit"): _Launch(32, 128, 8, 2),
    # 246 [250] regs, no spills, 84 HGMMA; packed 2×2 patches 254 [255], no spills (2 stages spilled 16 B
    # there; 45×45 maps still spill 72 [24] B, a pending case)
    ("bwd", 64, "fp32"): _Launch(16, 64, 4, 1),
    # 204 [214] regs, no spills, FMA (4 warps spilled 96 B under 3.6); exact fp32 takes it too: 150 regs
    ("bwd", 64, "fp64"): _Launch(32, 32, 8, 2),
    # 237 [248] regs, no spills, 112 KiB, 28 HGMMA. 32×64/4/2 spilled 8 B under 3.6 (3.9: 251 regs, clean),
    # 32×64/4/1 72 [112] B, 64×64/4/2 256 B, 64×128/8/2 128 B
    ("bwd", 128, "16bit"): _Launch(32, 128, 8, 2),
    # every setting tried spilled: split 16-wide chunks 16×64/4/1 104 B, 32×64/4/1 208 B, 64×64/4/1 616 B
    ("bwd", 128, "fp32"): None,
    # 242 [230] regs, no spills, 72 KiB, FMA
    ("bwd", 128, "fp64"): _Launch(16, 16, 8, 1),
    # split, 32-wide chunks: 147 [149] / 204 [204] regs, no spills, 20 / 28 KiB, 4 / 10 HGMMA
    ("bwd", 256, "16bit"): _Launch(32, 64, 8, 2, chunk=32, split=True),
    # split, 16-wide chunks: 16×32/8/1 runs tf32 wgmma with N = 8 in dQ; 16×32/4/1 64 B, 16×64/4/1 744 B
    ("bwd", 256, "fp32"): None,
    # split, 16-wide chunks: 126 [150] / 226 [228] regs, no spills, 34 [34 / 32] KiB, FMA
    ("bwd", 256, "fp64"): _Launch(16, 16, 8, 1, chunk=16, split=True),
    # backward dK, dV. The deterministic launch runs these tiles in its dK/dV programs and the "dq"
    # entry's in its dQ programs, with this entry's num_warps and num_stages; its figures, sm_90,
    # triton 3.9 [3.6], all without spills and, up to head dim 128 outside fp64, on wgmma alone:
    # regs D16 16-bit 103 [103], fp32 168 [175], fp64 254 [254]; D32 114 [114], 198 [240], 222 [238];
    # D64 134 [140], 224 [222], 254 [252]; D128 229 [239], dV / dK+dQ 233 / 236 [225 / 242], 218 [228];
    # D256 156 / 194 [149 / 194], 162 / 237 [162 / 237] (mma.sync), 126 / 173 [150 / 228]; 2×2 patches
    # at D64: 16-bit 255 [254], fp32 140 / 255 [154 / 254]; exact fp32 D30 76 [80], D64 80 [255],
    # D128 164 [164] (_IEEE_LAUNCH)
    # sm_90: 85 regs, no spills, 12 KiB, 6 HGMMA; sm_80 100 regs, 11 KiB
    ("dkdv", 16, "16bit"): _Launch(32, 128, 8, 2),
    # sm_90: 121 regs, no spills, 24 KiB, 36 HGMMA; sm_80 168 regs, 20 KiB
    ("dkdv", 16, "fp32"): _Launch(32, 64, 4, 2),
    # sm_90: 214 regs, no spills, 28 KiB, FMA
    ("dkdv", 16, "fp64"): _Launch(32, 64, 4, 2),
    # sm_90: 110 regs, no spills, 24 KiB, 8 HGMMA; sm_80 128 regs, 22 KiB, spills 16 B
    ("dkdv", 32, "16bit"): _Launch(32, 128, 8, 2),
    # sm_90: 193 regs, no spills, 48 KiB, 48 HGMMA; sm_80 255 regs, 40 KiB, spills 16 B
    ("dkdv", 32, "fp32"): _Launch(32, 64, 4, 2),
    # sm_90: 168 regs, no spills, 28 KiB, FMA (triton 3.6: 234 regs, no spills; 32×32/4/2 spills 24 B there)
    ("dkdv", 32, "fp64"): _Launch(16, 32, 4, 2),
    # sm_90: 134 regs, no spills, 48 KiB, 12 HGMMA; sm_80 208 regs, 44 KiB
    ("dkdv", 64, "16bit"): _Launch(32, 128, 8, 2),
    # sm_90: 231 regs, no spills, 80 KiB, 60 HGMMA; sm_80 255 regs, 72 KiB, spills 96 B
    ("dkdv", 64, "fp32"): _Launch(16, 64, 4, 2),
    # sm_90: 236 regs, no spills, 72 KiB, FMA
    ("dkdv", 64, "fp64"): _Launch(32, 32, 4, 2),
    # sm_90: 230 regs, no spills, 64 KiB, 20 HGMMA; sm_80 255 regs, 52 KiB
    ("dkdv", 128, "16bit"): _Launch(32, 64, 4, 2),
    # dV then dK (split), S and dP over 16-wide chunks: sm_90 217 / 224 regs, no spills, 16 KiB, 12 /
    # 18 HGMMA (triton 3.6: 209 / 222 regs). One launch holding K and V spilled at every setting
    # (16×64/4/1: 816 B, 144 KiB): K, V and their tf32 halves sit in shared memory for the whole loop,
    # and the wgmma descriptors of their 16 steps along the head dim stay live in registers. Not 8
    # warps with 16-wide query tiles: tf32 wgmma with N = 8 (triton-lang/triton#10629; on an H200 an
    # illegal memory access, gradients 83% off at head dim 108).
    ("dkdv", 128, "fp32"): _Launch(16, 64, 4, 2, chunk=16, split=True),
    # sm_90: 212 regs, no spills, 72 KiB, FMA
    ("dkdv", 128, "fp64"): _Launch(16, 16, 8, 1),
    # split, 32-wide chunks: sm_90 147 / 168 regs, no spills, 20 / 24 KiB, on wgmma (triton 3.6: 149 /
    # 169). Held whole, one launch: 16×32/4/1 (248 regs, 50 KiB) ran mma.sync, and 64-row tiles on
    # wgmma spilled
    ("dkdv", 256, "16bit"): _Launch(32, 64, 8, 2, chunk=32, split=True),
    # split, 16-wide chunks, HMMA. Unchunked, one launch: 264 B of spills at 16×16/8/1. 16×32/8/1
    # spilled 8 B under triton 3.6 in the deterministic launch on sequences whose length is not
    # 16-divisible (23×23 patch tokens); 32×16/8/1 there: 152 / 228 regs in both versions
    ("dkdv", 256, "fp32"): _Launch(32, 16, 8, 1, chunk=16, split=True),
    # split, 16-wide chunks: sm_90 126 / 172 regs, no spills, 34 KiB, FMA (triton 3.6: 150 / 228).
    # Unchunked, one launch: 456 B of spills at 16×16/8/1
    ("dkdv", 256, "fp64"): _Launch(16, 16, 8, 1, chunk=16, split=True),
    # backward dQ
    # sm_90: 103 regs, no spills, 16 KiB, 6 HGMMA; sm_80 101 regs, 12 KiB
    ("dq", 16, "16bit"): _Launch(128, 64, 8, 2),
    # sm_90: 167 regs, no spills, 32 KiB, 36 HGMMA; sm_80 245 regs, 24 KiB
    ("dq", 16, "fp32"): _Launch(64, 64, 4, 2),
    # sm_90: 254 regs, no spills, 36 KiB, FMA
    ("dq", 16, "fp64"): _Launch(64, 64, 4, 2),
    # sm_90: 114 regs, no spills, 32 KiB, 8 HGMMA; sm_80 146 regs, 24 KiB
    ("dq", 32, "16bit"): _Launch(128, 64, 8, 2),
    # sm_90: 197 regs, no spills, 64 KiB, 48 HGMMA; sm_80 255 regs, 48 KiB, spills 288 B
    ("dq", 32, "fp32"): _Launch(64, 64, 4, 2),
    # sm_90: 224 regs, no spills, 52 KiB, FMA
    ("dq", 32, "fp64"): _Launch(64, 32, 4, 2),
    # sm_90: 124 regs, no spills, 64 KiB, 12 HGMMA; sm_80 182 regs, 48 KiB
    ("dq", 64, "16bit"): _Launch(128, 64, 8, 2),
    # sm_90: 216 regs, no spills, 96 KiB, 60 HGMMA; sm_80 255 regs, 80 KiB, spills 480 B
    ("dq", 64, "fp32"): _Launch(64, 32, 4, 2),
    # sm_90: 206 regs, no spills, 56 KiB, FMA (triton 3.6: 214 regs, no spills; 32×32/4/2 spills 16 B there)
    ("dq", 64, "fp64"): _Launch(32, 32, 4, 1),
    # sm_90: 197 regs, no spills, 96 KiB, 20 HGMMA; sm_80 255 regs, 64 KiB, spills 232 B
    ("dq", 128, "16bit"): _Launch(64, 64, 4, 2),
    # 16-wide chunks: sm_90 229 regs, no spills, 16 KiB, 18 HGMMA (triton 3.6: 229 regs). Q and dO
    # held whole: 336 B of spills at this setting, 160 KiB
    ("dq", 128, "fp32"): _Launch(64, 16, 4, 2, chunk=16),
    # sm_90: 202 regs, no spills, 56 KiB, FMA (triton 3.6: 212 regs, no spills; 16×32/4/1 spills 88 B there)
    ("dq", 128, "fp64"): _Launch(16, 16, 8, 1),
    # sm_90: 236 regs, no spills, 80 KiB, 33 HGMMA; sm_80 255 regs, 74 KiB, spills 16 B
    ("dq", 256, "16bit"): _Launch(64, 16, 4, 1),
    # 16-wide chunks: sm_90 237 regs, no spills, 32 KiB, 144 HMMA (triton 3.6: 235). Unchunked:
    # 200 B of spills at 16×16/8/1
    ("dq", 256, "fp32"): _Launch(32, 32, 8, 1, chunk=16),
    # 16-wide chunks: sm_90 128 regs, no spills, 34 KiB, FMA (triton 3.6: 218). Unchunked: 328 B
    ("dq", 256, "fp64"): _Launch(16, 16, 8, 1, chunk=16),
}

# Settings for the in-place patch path (P > 1: every feature of a token addressed on its own, which
# takes more registers), replacing the _LAUNCH entry where one is given. None: the public ops pack
# patches into sequences (``_packs``) and launch the sequence path, so nothing launches P > 1 now.
# (Before packing, 2×2 patches at head dim 64 took 64×32/4/2 in 16-bit, 64×16/4/3 in fp32, and
# fp32 dQ 64×16/4/2 and dK/dV 16×64/4/1 chunked and split: the _LAUNCH entries spilled there.)
_PATCH_LAUNCH = {}


# Exact fp32 (precision="ieee", FMA units) takes the fp64 entries, except where those spill with
# fp32 operands: these replace them (chosen on `attention fp32-ieee D=<d>`, sm_90, clean in triton
# 3.9 and 3.6 alike).
_IEEE_LAUNCH = {
    # the fp64 entry 32×32/4/2 spills 16 B (3.6, 255 regs) on sequences whose length is not
    # 16-divisible (a packed 45×45 map); sm_90: 64 regs in both
    ("fwd", 64): _Launch(32, 32, 8, 2),
    # the fp64 entry 16×32/4/2 spills 8 B (3.9); sm_90: 58 regs, 20 KiB
    ("dkdv", 32): _Launch(32, 32, 8, 2),
    # the fp64 entry 32×32/4/2 spills 504 B (3.9), 16×32/4/2 40 B under 3.6; sm_90: 80 regs, 36 KiB
    ("dkdv", 64): _Launch(32, 32, 8, 2),
    # the fp64 entry 16×32/4/1 spills 288 B (3.9), 32×32/8/2 3784 B; sm_90: 168 regs, 34 KiB
    ("fwd", 128): _Launch(32, 16, 4, 2),
    # the deterministic launch (dK/dV programs with the fp64 dQ entry's 16×16 dQ programs): the fp64
    # entry 16×16/8/1 spills 16 B (3.9 and 3.6), 16×16/4/1 16 B on sequences whose length is not
    # 16-divisible (a packed 45×45 map, 3.9); 16×32/8/1: 120 regs, 88 there, in both versions
    ("dkdv", 128): _Launch(16, 32, 8, 1),
}


def _dtype_class(dtype: torch.dtype, precision=None) -> str:
    """The dtype's class in ``_LAUNCH``: "16bit", "fp32" (on tensor cores: 3×TF32 or tf32) or
    "fp64". Exact fp32 (``precision="ieee"``) runs on the FMA units as float64 does and takes the
    fp64 entries (``_IEEE_LAUNCH`` replaces three): the fp32 ones, chosen for 3×TF32, spill there
    (triton 3.6, head dim 64: forward 5608 B, dQ 2512 B)."""
    if dtype == torch.float32 and dot_precision(dtype, precision) == "ieee":
        return "fp64"
    return {torch.float16: "16bit", torch.bfloat16: "16bit", torch.float32: "fp32", torch.float64: "fp64"}[dtype]


def _block_d(head_dim: int) -> int:
    return max(16, next_pow2(head_dim))


def _shared_memory_estimate(kernel: str, block_m: int, block_n: int, block_d: int, elt_bytes: int,
                            num_stages: int) -> int:
    """Bytes of shared memory the tiles streamed through ``kernel``'s loop need, ``num_stages`` deep.

    The streamed tiles are the second operands of the dot products: K and V (BLOCK_N × BLOCK_D each)
    for "fwd" and "dq", Q and dO (BLOCK_M × BLOCK_D each) for "bwd" and "dkdv"; "delta" has no dot. The rule
    (tile bytes × stages) is the one Triton's matmul used to prune its configs. It counts the main
    term only: Triton also stages layout conversions through shared memory, so a launch under the
    device's limit can still fail with OutOfResources (the tuner records such a failure).
    """
    rows = {"fwd": block_n, "dq": block_n, "bwd": block_m, "dkdv": block_m, "delta": 0}[kernel]
    return 2 * rows * block_d * elt_bytes * max(1, num_stages or 1)


_OVERRIDES = {}  # kernel -> launch settings replacing its table entry (set by _launch_override only)


def _check_launch(kernel: str, cfg: dict) -> None:
    where = "_launch_override"
    check_launch_settings(where, kernel, cfg, _KERNELS, _LAUNCH_KEYS)
    for key, value in cfg.items():
        if kernel == "delta" and key in ("BLOCK_N", "num_stages", "BLOCK_DC", "SPLIT"):
            raise ValueError(f"{where}: {key} for the Δ kernel, which has no key blocks and no loop; "
                             "expected BLOCK_M and num_warps only")
        if kernel in ("fwd", "dq") and key == "SPLIT":
            raise ValueError(f"{where}: SPLIT for the {kernel} kernel, which has one accumulator; "
                             "expected it for bwd and dkdv only")
        if key == "SPLIT" and value not in (0, 1):
            raise ValueError(f"{where}: SPLIT = {value!r}; expected 0 or 1 (or a bool)")


@contextlib.contextmanager
def _launch_override(kernel: str, **cfg):
    """Inside the ``with`` block, launch ``kernel`` ("fwd", "delta", "bwd", "dkdv" or "dq") with ``cfg``
    (any of BLOCK_M, BLOCK_N, num_warps, num_stages) in place of its ``_LAUNCH`` entry, for every
    head dim and dtype (and under the interpreter too). Nests; not thread-safe.

    For the tuners (``attnsr tune``, ``benchmarks/tune.py``) and the tests; the public functions never set it.
    """
    _check_launch(kernel, cfg)
    with overriding(_OVERRIDES, kernel, cfg):
        yield


def _sm_count(device: torch.device):
    """The number of SMs of a CUDA device (``_runtime.sm_count``, read once per device); None for
    other devices (the compile report's CPU tensors keep the table settings)."""
    return sm_count(device) if device.type == "cuda" else None


def _fill_sms(cfg: dict, device: torch.device, rows: int, batch_heads: int) -> dict:
    """The forward's table setting with BLOCK_M halved while its programs, cdiv(rows, BLOCK_M) per
    (batch, head), number fewer than the device's SMs (a call with B·H = 1 on an H200 otherwise
    leaves most of its 132 SMs idle), down to 16 rows per warp (64 with 4 warps: a wgmma's rows per
    warp group). The warps stay: each thread then holds fewer query rows and no more of K and V
    (checked on sm_90 for the entries it halves: no spills, still wgmma)."""
    sms = _sm_count(device)
    if sms is None:
        return cfg
    while cfg["BLOCK_M"] > 16 * cfg["num_warps"] and triton.cdiv(rows, cfg["BLOCK_M"]) * batch_heads < sms:
        cfg["BLOCK_M"] //= 2
    return cfg


def _config(kernel: str, head_dim: int, dtype: torch.dtype, patch: int = 1, precision=None, shape=None,
            rows=None):
    """(block-size constexprs, launch settings) of ``kernel`` for a head dim, dtype, patch size and
    fp32 precision (None: PyTorch's setting; see ``_dtype_class``). ``shape``: (device, tokens,
    batch × heads) of the call, for the settings measured on that device (``attnsr tune``).
    ``rows``: the forward's query count, for ``_fill_sms`` (applied to table settings on CUDA only).

    The tuner's override where one is set, else the setting measured on the device for the call's
    shape class (``_tuned``), else the ``_PATCH_LAUNCH`` entry for patches where there is one, else
    the ``_LAUNCH`` entry on a GPU, or 32×32 tiles under the interpreter (where num_warps and
    num_stages mean nothing).
    """
    block_d = _block_d(head_dim)
    tuned = None
    if shape is not None and kernel not in _OVERRIDES:
        device, tokens, batch_heads = shape
        key = _tuned.attention_key(kernel, block_d, dtype, dot_precision(dtype, precision), patch, tokens,
                                   batch_heads) if _tuned.table(device) else None
        tuned = _tuned.launch_setting(device, key) if key else None
    if tuned is not None:
        try:
            _check_launch(kernel, tuned)
            if "BLOCK_M" not in tuned or ("BLOCK_N" not in tuned and kernel != "delta"):
                raise ValueError("it lacks BLOCK_M or BLOCK_N")
            cfg = dict(tuned)
        except ValueError as why:
            warnings.warn(f"attnsr: the tuned setting {key} is not usable ({why}); the shipped one applies",
                          stacklevel=2)
            tuned = None
    entry = None
    if tuned is None:
        key = (kernel, block_d, _dtype_class(dtype, precision))
        entry = _PATCH_LAUNCH.get(key, _LAUNCH[key]) if patch > 1 else _LAUNCH[key]
        if dtype == torch.float32 and key[2] == "fp64" and patch == 1:  # exact fp32 on the FMA units
            entry = _IEEE_LAUNCH.get((kernel, block_d), entry)
        if entry is None:  # no spill-free one-pass backward here: None, unless a tuner overrides it
            if kernel not in _OVERRIDES:
                return None
            entry = _LAUNCH[("dkdv", *key[1:])]  # what the override does not set
    if tuned is None and interpreting():
        cfg = dict(BLOCK_M=32, BLOCK_N=32)
    elif tuned is None:
        cfg = dict(BLOCK_M=entry.block_m, BLOCK_N=entry.block_n, num_warps=entry.num_warps,
                   num_stages=entry.num_stages, BLOCK_DC=entry.chunk, SPLIT=int(entry.split))
        if kernel == "fwd" and rows is not None and shape is not None and kernel not in _OVERRIDES:
            cfg = _fill_sms(cfg, shape[0], rows, shape[2])
    cfg.update(_OVERRIDES.get(kernel, {}))
    if kernel == "delta":  # no key blocks, no loop to pipeline
        cfg.pop("BLOCK_N", None)
        cfg.pop("num_stages", None)
    blocks = dict(BLOCK_M=cfg.pop("BLOCK_M"), BLOCK_D=block_d)
    if "BLOCK_N" in cfg:
        blocks["BLOCK_N"] = cfg.pop("BLOCK_N")
    chunk, split = cfg.pop("BLOCK_DC", 0), cfg.pop("SPLIT", 0)
    if kernel != "delta":
        blocks["BLOCK_DC"] = min(chunk, block_d)
    if kernel in ("bwd", "dkdv"):
        blocks["PART"] = (1, 2) if split else (0,)  # the launcher runs one launch per part
    if kernel == "bwd":
        # the dQ product on tensor cores: transposed (Kᵀ dSᵀ, the head dim as a wgmma's 64 rows)
        # where a tile has fewer queries than that, with a head-dim chunk of 64 at least when
        # chunked; as is on the FMA units (float64, exact fp32)
        chunk = blocks["BLOCK_DC"]
        blocks["DQ_T"] = blocks["BLOCK_M"] < 64 and block_d >= 64 and _dtype_class(dtype, precision) != "fp64"
        blocks["DQ_CHUNK"] = min(block_d, max(chunk, 64)) if blocks["DQ_T"] else chunk
    return blocks, cfg


def _dtypes(dtype: torch.dtype, precision=None) -> dict:
    return dict(ACC=acc_dtype(dtype), PRECISION=dot_precision(dtype, precision), DOT=dot_dtype(dtype))


_FORWARD_PLANS = LaunchPlans()
_BACKWARD_PLANS = LaunchPlans()


def _packed_strides(lay: _Tokens, heads: int, n: int, d: int) -> tuple:
    """The 7 strides (as ``_Tokens.strides``) that address a contiguous (B, heads, n, d) buffer
    through ``lay``'s token grid (TW tokens a row) and patch order (d = channel·P² + i·P + j)."""
    p = lay.patch
    return (heads * n * d, n * d, lay.tw * d, d, p * p, p, 1)


def _call_key(layout: _Tokens, q, k, v, scale: float, precision: str) -> tuple:
    """What a call's launches depend on besides the tensors' addresses (see ``LaunchPlans``)."""
    return (layout.kind, layout.heads, layout.patch, layout.width, q.dtype, q.device, q.shape, k.shape, q.stride(),
            k.stride(), v.stride(), scale, precision)


def attention_forward(q, k, v, layout: _Tokens, n_q: int, n_kv: int, head_dim: int, scale: float, precision=None,
                      plans=None):
    """Launch the forward kernel. Returns (out shaped like q, LSE (B, heads, N) in base 2).

    ``precision``: how fp32 dot products run ("tf32x3", "tf32", "ieee"; None or "auto": PyTorch's
    setting, read here once). ``plans``: the launch plans of the call's signature where the caller
    keeps them (a dict; ``LaunchPlans``), else the launcher's own, keyed by shapes and strides."""
    batch, heads = q.shape[0], layout.heads
    out = layout.empty_like(q)
    lse = torch.empty((batch, heads, n_q), dtype=stat_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out, lse
    precision = dot_precision(q.dtype, precision)
    shape = (q.device, max(n_q, n_kv), batch * heads)

    def launch():
        lay = layout.for_tensors(q, k, v, out)
        blocks, settings = _config("fwd", head_dim, q.dtype, lay.patch, precision, shape, rows=n_q)
        grid = (triton.cdiv(n_q, blocks["BLOCK_M"]), heads, batch)
        _attn_fwd_kernel[grid](
            q, k, v, out, lse,
            *lay.strides(q), *lay.strides(k), *lay.strides(v), *lay.strides(out),
            n_q, n_kv, head_dim, lay.tw, heads, scale * LOG2E,
            P=lay.patch, **_dtypes(q.dtype, precision), **blocks, MASK_D=head_dim != blocks["BLOCK_D"],
            NEG=scale < 0, SPLIT_LAST=_dtype_class(q.dtype, precision) != "fp64", **settings,
        )

    key = _call_key(layout, q, k, v, scale, precision) if plans is None else ("fwd", precision)
    _FORWARD_PLANS.launch(key, (q, k, v, out, lse), launch, plans, given=3)
    return out, lse


def attention_backward(do, q, k, v, out, lse, layout: _Tokens, n_q: int, n_kv: int, head_dim: int, scale: float,
                       need_dq: bool = True, need_dkdv: bool = True, precision=None, grads=None, plans=None):
    """Launch the backward kernels. ``do`` may have any strides (stride 0 included).

    Returns (dq, dk, dv); a gradient that is not needed comes back as an empty (0,) tensor and its
    kernel is not launched (dK and dV share one kernel). ``grads``: (dq, dk, dv) to write into
    (views of one buffer laid out like a fused qkv map, say) instead of fresh tensors. ``plans``: as
    in ``attention_forward``.
    """
    batch, heads = q.shape[0], layout.heads
    if grads is not None:
        dq, dk, dv = grads
    else:
        dq = layout.empty_like(q) if need_dq else q.new_empty((0,))
        dk, dv = (layout.empty_like(k), layout.empty_like(v)) if need_dkdv else (q.new_empty((0,)), q.new_empty((0,)))
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    precision = dot_precision(q.dtype, precision)
    # the mode, decided once per call: the one-pass backward (dQ summed with atomics) unless PyTorch
    # is asked for deterministic algorithms; it needs both dQ and dK/dV (else one kind of program
    # does all, deterministic anyway), and a spill-free launch setting (see _LAUNCH)
    one_pass = need_dq and need_dkdv and not torch.are_deterministic_algorithms_enabled()
    delta = torch.empty_like(lse)
    # the one-pass backward's dQ sums: dq itself where it is fp32 or float64, else an fp32
    # (B, heads, N, D) buffer that a last kernel casts into dq
    direct = dq.dtype in (torch.float32, torch.float64)
    acc = dq if direct else delta  # delta: a stand-in, unused
    if one_pass and not direct:
        acc = torch.empty((batch, heads, n_q, head_dim), dtype=torch.float32, device=q.device)
    shape = (q.device, max(n_q, n_kv), batch * heads)

    def launch():
        lay = layout.for_tensors(do, q, k, v, out, dq, dk, dv)

        def strides(t):  # a gradient not asked for is a (0,) placeholder, never addressed
            return lay.strides(t) if t.dim() == 4 else (0,) * 7

        dtypes = _dtypes(q.dtype, precision)
        bwd = _config("bwd", head_dim, q.dtype, lay.patch, precision, shape) if one_pass else None
        acc_strides = strides(dq) if direct or bwd is None else _packed_strides(lay, heads, n_q, head_dim)
        d_blocks, d_settings = _config("delta", head_dim, q.dtype, lay.patch, precision, shape)
        d_grid = (triton.cdiv(n_q, d_blocks["BLOCK_M"]), heads, batch)
        _attn_bwd_delta_kernel[d_grid](
            out, do, delta, acc, *lay.strides(out), *lay.strides(do), *acc_strides,
            n_q, head_dim, lay.tw, heads,
            P=lay.patch, ACC=dtypes["ACC"], **d_blocks, ZERO_DQ=bwd is not None, **d_settings,
        )
        strides_in = (*lay.strides(q), *lay.strides(k), *lay.strides(v), *lay.strides(do), *strides(dk),
                      *strides(dv))
        if bwd is not None:
            blocks, settings = bwd
            for part in blocks.pop("PART"):  # (0,): dK, dV and dQ together; (1, 2): dV, then dK and dQ
                _attn_bwd_kernel[(triton.cdiv(n_kv, blocks["BLOCK_N"]), heads, batch)](
                    q, k, v, do, dk, dv, acc, lse, delta, *strides_in, *acc_strides,
                    n_q, n_kv, head_dim, lay.tw, heads, scale, scale * LOG2E,
                    P=lay.patch, **dtypes, **blocks, PART=part, **settings,
                )
            if not direct:
                _attn_bwd_dq_cast_kernel[d_grid](
                    acc, dq, *acc_strides, *lay.strides(dq), n_q, head_dim, lay.tw,
                    P=lay.patch, **d_blocks, **d_settings,
                )
            return
        # deterministic: dK/dV programs (one per key block), then dQ programs (one per query
        # block), in one launch; a split dK/dV entry runs its dV programs in a launch before
        kv_blocks, settings = _config("dkdv", head_dim, q.dtype, lay.patch, precision, shape)
        q_blocks, q_settings = _config("dq", head_dim, q.dtype, lay.patch, precision, shape)
        parts = kv_blocks.pop("PART")
        if not need_dkdv:
            parts = ()
        kv_programs = triton.cdiv(n_kv, kv_blocks["BLOCK_N"])
        q_programs = triton.cdiv(n_q, q_blocks["BLOCK_M"])
        for i, part in enumerate(parts or (None,)):
            with_q = need_dq and i == len(parts or (None,)) - 1  # the dQ programs go with the last part
            programs = 0 if part is not None and with_q else 1 if part is not None else 2
            if part is None:  # dQ alone: its own launch settings
                settings = q_settings
            count = (kv_programs if part is not None else 0) + (q_programs if with_q else 0)
            if count == 0:  # neither gradient wanted
                continue
            _attn_bwd_det_kernel[(count, heads, batch)](
                q, k, v, do, dk, dv, dq, lse, delta, *strides_in, *strides(dq),
                n_q, n_kv, head_dim, lay.tw, heads, scale, scale * LOG2E,
                kv_programs if part is not None else 0,
                P=lay.patch, **dtypes, **kv_blocks, PART=part or 0, BLOCK_M2=q_blocks["BLOCK_M"],
                BLOCK_N2=q_blocks["BLOCK_N"], BLOCK_DC2=q_blocks["BLOCK_DC"], PROGRAMS=programs, **settings,
            )

    # the saved q, k, v and out may come back from a saved-tensor hook with other strides than the
    # call's signature says: theirs are in the key
    key = (_call_key(layout, q, k, v, scale, precision) if plans is None else ("bwd", precision, q.stride(),
                                                                              k.stride(), v.stride()),
           out.stride(), do.stride(), dq.stride(), dk.stride(), dv.stride(), need_dq, need_dkdv, one_pass)
    # dq, dk, dv may be views of the caller's buffer: their alignment is looked at too
    _BACKWARD_PLANS.launch(key, (do, q, k, v, out, dq, dk, dv, lse, delta, acc), launch, plans, given=8)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Autograd and torch.compile: two torch.library custom ops with fake (meta) kernels
# ----------------------------------------------------------------------------------------------


def _geometry(q: torch.Tensor, k: torch.Tensor, kind: str, heads: int, patch: int):
    """(layout, N, M, D) of a call: ``kind`` is "seq" for (B, H, N, D) or "map" for (B, C, H, W)."""
    if kind == "seq":
        return _Tokens("seq", heads, 1, 1), q.shape[2], k.shape[2], q.shape[3]
    _, c, h, w = q.shape
    n = (h // patch) * (w // patch)
    return _Tokens("map", heads, patch, w), n, n, c // heads * patch * patch


def _aligned(t: torch.Tensor) -> bool:
    """Whether Triton sees map ``t``'s strides as 16-divisible: every stride the kernels take (batch,
    channel and token strides; the row stride only where the pixels are not one run) is 1, 0 or a
    multiple of 16 elements. Triton specialises integer arguments on that divisibility, and only
    then can a kernel load 16 bytes at a time from a map; on a map like a 45×45 NCHW one (channel
    stride 2025) every load is scalar, and the sm_90 compile of the attention kernels spilled
    (fp32 and bf16 at head dims 64 and 128, 8 to 904 B)."""
    sb, sc, sh, sw = t.stride()
    flat = sh == t.shape[-1] * sw
    return all(s <= 1 or s % 16 == 0 for s in ((sb, sc, sw) if flat else (sb, sc, sh, sw)))


def _packs(kind: str, patch: int, *maps: torch.Tensor) -> bool:
    """Whether a call runs its kernels on packed sequences (``pack.py``): the patches (p > 1) of
    maps, whose features are p-wide runs one image row apart, and pixel maps whose strides are not
    16-divisible (``_aligned``). Other pixels (p = 1) are read in place: their features are one
    stride apart (unit stride in channels_last), and their tokens adjacent."""
    return kind == "map" and (patch > 1 or not all(_aligned(t) for t in maps))


def _packed_forward(q, k, v, layout: "_Tokens", n_q: int, n_kv: int, head_dim: int, scale: float, precision,
                    plans):
    """The forward of a packed call: q, k, v packed (one launch), the sequence forward, the output
    unpacked into a map like q (one launch). Returns (out, lse, the packed q, k, v and out)."""
    qs, ks, vs = pack((q, k, v), layout, n_q, head_dim)
    outs, lse = attention_forward(qs, ks, vs, _Tokens("seq", layout.heads, 1, 1), n_q, n_kv, seq_row(head_dim),
                                  scale, precision, plans)
    out = layout.empty_like(q)
    unpack((outs,), (out,), layout, n_q, head_dim)
    return out, lse, (qs, ks, vs, outs)


def _packed_backward(do, packed, lse, layout: "_Tokens", n_q: int, n_kv: int, head_dim: int, scale: float,
                     need_dq: bool, need_dkdv: bool, precision, targets, plans) -> None:
    """The backward of a packed call: dO packed (one launch), the sequence backward on the packed
    q, k, v, out, and dq, dk, dv unpacked (one launch) into ``targets`` (maps, or None where not
    wanted): fresh maps, or views of the caller's gradient buffer."""
    (dos,) = pack((do,), layout, n_q, head_dim)
    qs, ks, vs, outs = packed
    grads = attention_backward(dos, qs, ks, vs, outs, lse, _Tokens("seq", layout.heads, 1, 1), n_q, n_kv,
                               seq_row(head_dim), scale, need_dq, need_dkdv, precision, None, plans)
    unpack(grads, targets, layout, n_kv, head_dim)


@torch.library.custom_op("attnsr::attention", mutates_args=())
@on_tensor_device
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, heads: int, patch: int, scale: float,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    layout, n_q, n_kv, head_dim = _geometry(q, k, kind, heads, patch)
    if _packs(kind, patch, q, k, v):
        return _packed_forward(q, k, v, layout, n_q, n_kv, head_dim, scale, precision, None)[:2]
    return attention_forward(q, k, v, layout, n_q, n_kv, head_dim, scale, precision)


@_attention_op.register_fake
def _(q, k, v, kind, heads, patch, scale, precision):
    layout, n_q, _, _ = _geometry(q, k, kind, heads, patch)
    lse = q.new_empty((q.shape[0], heads, n_q), dtype=stat_dtype(q.dtype))
    return layout.empty_like(q), lse


@torch.library.custom_op("attnsr::attention_backward", mutates_args=())
@on_tensor_device
def _attention_backward_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    kind: str, heads: int, patch: int, scale: float, precision: str, need_dq: bool, need_dkdv: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layout, n_q, n_kv, head_dim = _geometry(q, k, kind, heads, patch)
    if _packs(kind, patch, q, k, v):  # the op saves maps: q, k, v packed again (one launch), out with dO (one)
        dq = layout.empty_like(q) if need_dq else q.new_empty((0,))
        dk, dv = (layout.empty_like(k), layout.empty_like(v)) if need_dkdv else (q.new_empty((0,)), q.new_empty((0,)))
        qs, ks, vs = pack((q, k, v), layout, n_q, head_dim)
        outs, dos = pack((out, do), layout, n_q, head_dim)
        grads = attention_backward(dos, qs, ks, vs, outs, lse, _Tokens("seq", heads, 1, 1), n_q, n_kv,
                                   seq_row(head_dim), scale, need_dq, need_dkdv, precision)
        unpack(grads, (dq if need_dq else None, dk if need_dkdv else None, dv if need_dkdv else None), layout,
               n_q, head_dim)
        return dq, dk, dv
    return attention_backward(do, q, k, v, out, lse, layout, n_q, n_kv, head_dim, scale, need_dq, need_dkdv,
                              precision)


@_attention_backward_op.register_fake
def _(do, q, k, v, out, lse, kind, heads, patch, scale, precision, need_dq, need_dkdv):
    layout = _geometry(q, k, kind, heads, patch)[0]
    dq = layout.empty_like(q) if need_dq else q.new_empty((0,))
    dk, dv = (layout.empty_like(k), layout.empty_like(v)) if need_dkdv else (q.new_empty((0,)), q.new_empty((0,)))
    return dq, dk, dv


def _setup_context(ctx, inputs, output):
    q, k, v, kind, heads, patch, scale, precision = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # a saved statistic, as the gating ops' statistics
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.meta = (kind, heads, patch, scale, precision)


def _backward(ctx, do, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    dq, dk, dv = _attention_backward_op(do, q, k, v, out, lse, *ctx.meta, need_q, need_k or need_v)
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None, None, None, None, None, None)


_attention_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast(_attention_op, "attention")


refuse_double_backward(_attention_backward_op, "flash_attention / image_attention")


class _Call:
    """What the checks of a call derived, kept per call signature (``ValidCalls``) with the launch
    plans of its forward and backward: a repeated call does no more than swap its tensors in."""

    __slots__ = ("head_dim", "heads", "kind", "layout", "n_kv", "n_q", "packed", "patch", "plans", "scale")

    def __init__(self, q, k, v, kind: str, heads: int, patch: int, scale: float):
        self.kind, self.heads, self.patch, self.scale = kind, heads, patch, scale
        self.layout, self.n_q, self.n_kv, self.head_dim = _geometry(q, k, kind, heads, patch)
        self.packed = _packs(kind, patch, q, k, v)  # run on packed sequences (``_packed_forward``)
        self.plans = {}


class _AttentionFunction(torch.autograd.Function):
    """The eager path of ``flash_attention`` / ``image_attention``: the launchers called directly.

    The custom ops above serve torch.compile (they carry the fake kernels and the compile-time
    autocast rule); in eager mode their dispatch costs more host time than the launches. Inputs:
    q, k, v, and ``base``: None, or the packed qkv tensor they are views of (``image_attention_qkv``);
    with a base, q, k, v come detached and the backward returns one gradient for the base.
    """

    @staticmethod
    def forward(ctx, q, k, v, base, call, precision):
        geometry = (call.layout, call.n_q, call.n_kv, call.head_dim, call.scale, precision, call.plans)
        ctx.set_materialize_grads(False)
        ctx.call, ctx.precision = call, precision
        ctx.grad_layout = None if base is None else grad_layout(base, (q, k, v))
        if call.packed:
            # the backward reads the packed q, k, v and out; the output map is saved only to tie a
            # gradient to the graph (``refuse_twice``), the inputs' memory formats to make their gradients
            with device_guard(q):
                out, lse, packed = _packed_forward(q, k, v, *geometry)
            ctx.save_for_backward(*packed, lse, base, out)
            ctx.map_formats = tuple(channels_innermost(t) for t in (q, k, v))
            return out
        with device_guard(q):
            out, lse = attention_forward(q, k, v, *geometry)
        ctx.save_for_backward(q, k, v, out, lse, base)
        return out

    @staticmethod
    def backward(ctx, do):
        if do is None:
            return None, None, None, None, None, None
        call = ctx.call
        geometry = (call.layout, call.n_q, call.n_kv, call.head_dim, call.scale)
        if call.packed:  # q, k, v, out: packed sequences; dO and the gradients: maps
            q, k, v, out, lse, base, out_map = ctx.saved_tensors
            if base is not None:
                dbase, targets = grad_views(ctx.grad_layout)
                need_q = need_k = need_v = True
            else:
                need_q, need_k, need_v = ctx.needs_input_grad[:3]
                formats = (torch.channels_last if last else torch.contiguous_format for last in ctx.map_formats)
                targets = tuple(poison(torch.empty(out_map.shape, dtype=out_map.dtype, device=out_map.device,
                                                   memory_format=fmt)) if need else None
                                for fmt, need in zip(formats, (need_q, need_k, need_v)))
            with device_guard(q):
                _packed_backward(do, (q, k, v, out), lse, *geometry, need_q, need_k or need_v, ctx.precision,
                                 targets, call.plans)
            if base is not None:
                (dbase,) = refuse_twice("flash_attention / image_attention", (base,), (dbase,))
                return None, None, None, dbase, None, None
            dq, dk, dv = refuse_twice("flash_attention / image_attention", (out_map,), targets)
            return dq, dk, dv, None, None, None
        q, k, v, out, lse, base = ctx.saved_tensors
        if base is not None:
            dbase, grads = grad_views(ctx.grad_layout)
            with device_guard(q):
                attention_backward(do, q, k, v, out, lse, *geometry, True, True, ctx.precision, grads, call.plans)
            (dbase,) = refuse_twice("flash_attention / image_attention", (base,), (dbase,))
            return None, None, None, dbase, None, None
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        with device_guard(q):
            dq, dk, dv = attention_backward(do, q, k, v, out, lse, *geometry, need_q, need_k or need_v,
                                            ctx.precision, None, call.plans)
        dq, dk, dv = refuse_twice("flash_attention / image_attention", (q, k, v),
                                  (dq if need_q else None, dk if need_k else None, dv if need_v else None))
        return dq, dk, dv, None, None, None


_apply = super(torch.autograd.Function, _AttentionFunction).apply  # Function.apply less its Python wrapper


def _attention(q, k, v, call: _Call, precision, packed=None):
    """One attention call: the custom op under torch.compile and torch.func transforms (as before
    the eager path existed), else the eager Function. ``packed``: the qkv tensor q, k, v were split
    from by ``image_attention_qkv`` (its gradient is then written as one buffer), or None."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        # None travels as "auto" and is resolved inside the op (PyTorch's setting is read at run
        # time, which torch.compile cannot trace)
        return _attention_op(q, k, v, call.kind, call.heads, call.patch, call.scale,
                             "auto" if precision is None else precision)[0]
    precision = dot_precision(q.dtype, precision)  # once per call: the backward runs as the forward did
    base = None if packed is None else packed_base(packed)
    if base is not None:
        q, k, v = q.detach(), k.detach(), v.detach()
    return _apply(q, k, v, base, call, precision)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def _check_head_dim(op: str, head_dim: int, how: str) -> None:
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"{op}: head dim D = {how} = {head_dim} is above the kernel's limit {MAX_HEAD_DIM}; "
            "use more heads or a smaller patch"
        )
    if head_dim < 1:
        raise ValueError(f"{op}: head dim D = {how} = {head_dim}; expected at least 1")


def _check_grid(op: str, batch: int, heads: int, n_q: int, n_kv: int) -> None:
    if batch > MAX_GRID_YZ or heads > MAX_GRID_YZ:
        raise ValueError(f"{op}: batch {batch} and heads {heads} must each be at most {MAX_GRID_YZ}")
    if max(n_q, n_kv) > MAX_TOKENS:
        raise ValueError(f"{op}: {max(n_q, n_kv)} tokens per sequence; the kernels handle at most {MAX_TOKENS}")


_CALLS = ValidCalls()


def flash_attention(q, k, v, *, scale=None, precision=None):
    """softmax(q kᵀ · scale) v, fused, forward and backward.

    q: (B, H, N, D), k and v: (B, H, M, D), any strides; D ≤ 256; N and M may differ.
    scale defaults to 1/sqrt(D). Returns (B, H, N, D), contiguous.
    precision (fp32 inputs only): "tf32x3" (about fp32 accuracy on tensor cores), "tf32" or "ieee"
    (exact fp32, no tensor cores); None: "tf32" where PyTorch allows tf32 for CUDA matmuls, else "tf32x3".
    """
    op = "flash_attention"
    q, k, v = autocast_inputs(q, k, v)  # first: a call under autocast is looked up by the dtype it runs in
    sig, call = _CALLS.lookup((q, k, v), (op, scale, precision))
    if call is not None:
        if not q.is_cuda:
            check_runnable(op, q.device)
        return _attention(q, k, v, call, precision)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t)
        check_rank(op, name, t, 4, "(B, H, N, D)")
    check_no_forward_ad(op, q, k, v)
    q, k, v = autocast_inputs(q, k, v)
    check_same(op, {"q": q, "k": k, "v": v})
    if k.shape != v.shape:
        raise ValueError(f"{op}: k is {tuple(k.shape)} but v is {tuple(v.shape)}; k and v must share (B, H, M, D)")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{op}: q is {tuple(q.shape)} but k is {tuple(k.shape)}; expected q (B, H, N, D) and k (B, H, M, D) "
            "with the same B, H and D"
        )
    batch, heads, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    _check_head_dim(op, head_dim, "q.shape[3]")
    if n_kv == 0 and n_q > 0 and batch * heads > 0:
        raise ValueError(f"{op}: k and v have M = 0 keys; softmax over no keys is undefined")
    scale = check_scale(op, scale, head_dim)
    check_precision(op, precision)
    check_runnable(op, q.device)
    _check_grid(op, batch, heads, n_q, n_kv)
    call = _Call(q, k, v, "seq", heads, 1, scale)
    _CALLS.remember(sig, call)
    return _attention(q, k, v, call, precision)


def image_attention(q, k, v, *, heads=1, patch_size=1, scale=None, precision=None):
    """Self-attention over the pixels or p×p patches of feature maps, fused, forward and backward.

    q, k, v: (B, C, H, W) with any strides (NCHW, channels_last, ``qkv.split(C, 1)`` views of one
    fused conv output). Head h owns channels [h·C/heads, (h+1)·C/heads); a token is one
    patch_size×patch_size patch whose vector is the head's channels × p × p values, so
    D = C/heads·p², N = (H/p)·(W/p). scale defaults to 1/sqrt(D). Returns (B, C, H, W), channels_last
    when q has channels innermost, else contiguous. precision: as in ``flash_attention``.
    """
    return _image_attention(q, k, v, heads, patch_size, scale, precision, None)


def image_attention_qkv(qkv, *, heads=1, patch_size=1, scale=None, precision=None):
    """``image_attention`` of the three parts of one packed map, q, k, v = qkv.split(C, 1).

    qkv: (B, 3C, H, W), any strides (the output of one fused qkv convolution: NCHW or
    channels_last); the arguments as in ``image_attention``. Returns (B, C, H, W). Where qkv needs
    a gradient, the backward writes dq, dk and dv into one buffer laid out like qkv and hands it to
    autograd whole: no ``cat`` of three gradients, one launch less. (``image_attention`` of its
    split views computes the same, with autograd concatenating the three gradients.)
    """
    op = "image_attention_qkv"
    check_tensor(op, "qkv", qkv)
    check_rank(op, "qkv", qkv, 4, "(B, 3C, H, W)")
    if qkv.shape[1] % 3:
        raise ValueError(f"{op}: qkv is {tuple(qkv.shape)}; expected (B, 3C, H, W), 3C channels in all")
    (qkv,) = autocast_inputs(qkv)
    q, k, v = qkv.split(qkv.shape[1] // 3, 1)
    return _image_attention(q, k, v, heads, patch_size, scale, precision, qkv)


def _image_attention(q, k, v, heads, patch_size, scale, precision, packed):
    """``image_attention``, and ``image_attention_qkv`` with ``packed``: the qkv map q, k, v are
    the parts of."""
    op = "image_attention"
    q, k, v = autocast_inputs(q, k, v)  # first: a call under autocast is looked up by the dtype it runs in
    sig, call = _CALLS.lookup((q, k, v), (op, heads, patch_size, scale, precision))
    if call is not None:
        if not q.is_cuda:
            check_runnable(op, q.device)
        return _attention(q, k, v, call, precision, packed)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t)
        check_rank(op, name, t, 4, "(B, C, H, W)")
    check_no_forward_ad(op, q, k, v)
    q, k, v = autocast_inputs(q, k, v)
    check_same(op, {"q": q, "k": k, "v": v})
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"image_attention: q is {tuple(q.shape)} but {name} is {tuple(t.shape)}; "
                "q, k and v must share B, C, H, W"
            )
    heads, patch_size = positive_int(op, "heads", heads), positive_int(op, "patch_size", patch_size)
    batch, channels, height, width = q.shape
    if channels % heads:
        raise ValueError(f"{op}: heads = {heads} does not divide C = {channels}")
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"{op}: patch_size = {patch_size} does not divide the map size H×W = {height}×{width}"
        )
    head_dim = channels // heads * patch_size * patch_size
    _check_head_dim(op, head_dim, f"C/heads·p² = {channels}/{heads}·{patch_size}²")
    scale = check_scale(op, scale, head_dim)
    check_precision(op, precision)
    check_runnable(op, q.device)
    tokens = (height // patch_size) * (width // patch_size)
    _check_grid(op, batch, heads, tokens, tokens)
    call = _Call(q, k, v, "map", heads, patch_size, scale)
    _CALLS.remember(sig, call)
    return _attention(q, k, v, call, precision, packed)
