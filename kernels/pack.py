"""Patch tokens packed into a unit-stride (B, heads, N, D) sequence layout, and back.

Why. A p×p patch token's features are p-wide runs one image row apart (NCHW: pairs of 8 bytes in
fp32 at p = 2), so an attention kernel that reads them in place gathers every tile of K and V, for
every query block: O(N²·D) bytes at a few bytes per load instruction (the sm_90 compile showed no
128-bit global loads in any patch kernel). Moving them once into a sequence tensor whose head dim
is unit-stride costs one read and one write of N·D elements per tensor, after which the attention
kernels read 16-byte vectors; ``attention.py`` packs q, k, v (one launch), unpacks the output (one
launch) and, in the backward, packs dO and unpacks dq, dk, dv (one launch each way). Rows are
``seq_row(D)`` elements, D rounded up to a multiple of 16, the padding written as zeros: the
attention kernels then run with that head dim (the scale stays the caller's), whose feature masks
Triton sees as 16-wide (a D like 36 would leave every load scalar), and the zero features add
nothing to q·k nor to the output's and gradients' first D features, the ones unpacked.

Addressing of the map side: as in ``attention.py``'s header, feature d of token n of head h of
batch b is at base + b·s_b + h·s_h + row(n) + col(d), with row(n) = (n // TW)·s_r0 + (n % TW)·s_r1
and col(d) = (d // P²)·s_c0 + ((d // P) % P)·s_c1 + (d % P)·s_c2 (any strides: NCHW,
channels_last, fused-qkv views, stride-0 upstream gradients). The sequence side is
base + b·ss_b + h·ss_h + n·ss_n + d.

One launch moves up to three tensors (COUNT): program axis 0 is (tensor, token block). A program
copies a BLOCK_T × BLOCK_D tile, the sequence side written (or read) as unit-stride rows.

Limits: as the attention kernels' (head dim ≤ 256, token indices int32).
"""

import torch
import triton
import triton.language as tl

from ._runtime import LaunchPlans, interpreting, next_pow2

# Elements per program: 2048 (16 per thread at 4 warps; at least 16 tokens). With 4096 the unpack
# of a bf16 output at head dim 64 spilled 40 B on sm_90 under triton 3.6 (96 regs); the map side's
# int64 offsets take two registers per element.
_TILE = 2048
_WARPS = 4


@triton.jit
def _map_offsets(n, d, TW, s_r0, s_r1, P: tl.constexpr, s_c0, s_c1, s_c2):
    """(len(n), len(d)) int64 offsets of features d of tokens n in a map (see the header)."""
    rows = (n // TW).to(tl.int64) * s_r0 + (n % TW).to(tl.int64) * s_r1
    cols = (d // (P * P)).to(tl.int64) * s_c0 + ((d // P) % P).to(tl.int64) * s_c1 + (d % P).to(tl.int64) * s_c2
    return rows[:, None] + cols[None, :]


@triton.jit
def _move(MAP, SEQ, b, h, n, d, mask, seq_mask, seq_offs, s_b, s_h, TW, s_r0, s_r1, P: tl.constexpr, s_c0, s_c1, s_c2,
          TO_SEQ: tl.constexpr):
    """Copy one tile between a map (strides s_*, ``mask``) and a sequence tensor (offsets
    ``seq_offs``, ``seq_mask``: the rows with their padding)."""
    map_offs = b * s_b + h * s_h + _map_offsets(n, d, TW, s_r0, s_r1, P, s_c0, s_c1, s_c2)
    if TO_SEQ:  # the row's padding (D ≤ d < ROW) is written as zeros
        x = tl.load(MAP + map_offs, mask=mask, other=0.0)
        tl.store(SEQ + seq_offs, x.to(SEQ.dtype.element_ty), mask=seq_mask)
    else:
        x = tl.load(SEQ + seq_offs, mask=mask)
        tl.store(MAP + map_offs, x.to(MAP.dtype.element_ty), mask=mask)


@triton.jit
def _pack_kernel(
    M0, M1, M2,  # maps (B, C, H, W), any strides; M1 and M2 unused below COUNT 2 and 3
    S0, S1, S2,  # sequence tensors (B, heads, N, D), features unit-stride, strides ss_* shared by all
    m0_b, m0_h, m0_r0, m0_r1, m0_c0, m0_c1, m0_c2,  # M0 strides (elements): batch, head, row, col
    m1_b, m1_h, m1_r0, m1_r1, m1_c0, m1_c1, m1_c2,  # M1 strides
    m2_b, m2_h, m2_r0, m2_r1, m2_c0, m2_c1, m2_c2,  # M2 strides
    ss_b, ss_h, ss_n,  # sequence strides (elements): batch, head, token
    N, D,  # tokens, head dim (unpadded)
    ROW,  # features per sequence row written by a pack (D and its zero padding); D for an unpack
    TW,  # tokens per row of the map's token grid (W/p)
    BLOCKS,  # token blocks per tensor: cdiv(N, BLOCK_T)
    P: tl.constexpr,  # patch size
    COUNT: tl.constexpr,  # tensors moved by this launch: 1 to 3
    TO_SEQ: tl.constexpr,  # True: map -> sequence (pack); False: sequence -> map (unpack)
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,  # tokens and features per tile (BLOCK_D ≥ D)
):
    pid = tl.program_id(0)
    which = pid // BLOCKS
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    n = (pid % BLOCKS) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    mask = (n[:, None] < N) & (d[None, :] < D)
    seq_mask = (n[:, None] < N) & (d[None, :] < ROW)
    seq_offs = b * ss_b + h * ss_h + n.to(tl.int64)[:, None] * ss_n + d[None, :]
    if which == 0:
        _move(M0, S0, b, h, n, d, mask, seq_mask, seq_offs, m0_b, m0_h, TW, m0_r0, m0_r1, P,
              m0_c0, m0_c1, m0_c2, TO_SEQ)
    if COUNT > 1:
        if which == 1:
            _move(M1, S1, b, h, n, d, mask, seq_mask, seq_offs, m1_b, m1_h, TW, m1_r0, m1_r1, P,
                  m1_c0, m1_c1, m1_c2, TO_SEQ)
    if COUNT > 2:
        if which == 2:
            _move(M2, S2, b, h, n, d, mask, seq_mask, seq_offs, m2_b, m2_h, TW, m2_r0, m2_r1, P,
                  m2_c0, m2_c1, m2_c2, TO_SEQ)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def seq_row(head_dim: int) -> int:
    """Row stride (elements) of a packed sequence: the head dim rounded up to a multiple of 16, so
    that Triton sees a 16-divisible stride and the rows start 16-byte aligned (vector loads)."""
    return -(-head_dim // 16) * 16


def _tile(head_dim: int):
    block_d = max(16, next_pow2(head_dim))
    return (32 if interpreting() else max(16, _TILE // block_d)), block_d


_PLANS = LaunchPlans()


def _launch(maps, seqs, layout, n: int, head_dim: int, to_seq: bool) -> None:
    """One launch moving ``maps[i]`` <-> ``seqs[i]`` (sequence tensors with equal strides)."""
    count = len(maps)
    batch, heads = seqs[0].shape[0], seqs[0].shape[1]
    block_t, block_d = _tile(head_dim)
    blocks = triton.cdiv(n, block_t)

    def launch():
        lay = layout.for_tensors(*maps)
        strides = [lay.strides(m) for m in maps] + [(0,) * 7] * (3 - count)
        pad = list(maps) + [maps[0]] * (3 - count)
        spad = list(seqs) + [seqs[0]] * (3 - count)
        _pack_kernel[(blocks * count, heads, batch)](
            *pad, *spad, *strides[0], *strides[1], *strides[2],
            *seqs[0].stride()[:3], n, head_dim, seq_row(head_dim) if to_seq else head_dim, lay.tw, blocks,
            P=lay.patch, COUNT=count, TO_SEQ=to_seq, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=_WARPS,
        )

    key = (layout.kind, layout.heads, layout.patch, layout.width, to_seq, seqs[0].dtype, seqs[0].shape,
           seqs[0].stride(), seqs[0].device, *(m.dtype for m in maps), *(m.shape for m in maps),
           *(m.stride() for m in maps))
    _PLANS.launch(key, (*maps, *seqs), launch)


def pack(maps, layout, n: int, head_dim: int):
    """Sequence copies (B, heads, N, seq_row(D)) of up to three maps of one call, in one launch:
    the parts of one contiguous buffer, each row D features and zeros up to ``seq_row(D)``."""
    batch = maps[0].shape[0]
    buf = torch.empty((len(maps), batch, layout.heads, n, seq_row(head_dim)), dtype=maps[0].dtype,
                      device=maps[0].device)
    seqs = tuple(buf.unbind(0))
    if buf.numel():
        _launch(tuple(maps), seqs, layout, n, head_dim, True)
    return seqs


def unpack(seqs, maps, layout, n: int, head_dim: int) -> None:
    """Write the first ``head_dim`` features of sequence tensors (B, heads, N, ≥ D), features
    unit-stride, into ``maps`` (any strides): one launch per set of equal sequence strides. Pairs
    whose map is None are skipped."""
    pairs = [(s, m) for s, m in zip(seqs, maps) if m is not None and m.numel()]
    if not pairs:
        return
    # the sequence tensors of one launch share strides; the backward's may not (dq vs dk, dv)
    groups = {}
    for s, m in pairs:
        groups.setdefault(s.stride(), []).append((s, m))
    for group in groups.values():
        _launch(tuple(m for _, m in group), tuple(s for s, _ in group), layout, n, head_dim, False)
