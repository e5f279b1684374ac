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

The passes over the map are Triton kernels. The MLP (a few B×C×C/r products on the pooled fp32
statistics) runs in PyTorch between the launches: it touches no map-sized tensor and a kernel for
it would save nothing. Reductions over pixels are split into chunks per program for parallelism;
the per-chunk partials (B, C, chunks) are combined in PyTorch in a fixed order, so results are
bitwise reproducible (no atomics).

Registration. Two torch.library custom ops, each with a fake (meta) kernel so that
torch.compile(fullgraph=True) traces them: ``attnsr::channel_gate`` (forward passes 1 and 2 and
the MLP; returns y and the statistics above) and ``attnsr::channel_gate_backward`` (backward passes
1 and 2 and the MLP's backward), which the forward op's registered autograd formula calls. Under
torch.autocast, the floating-point inputs (float64 excepted) are cast to the autocast dtype, by the
public function and by the op's autocast rule (``_runtime.autocast_inputs``, the rule of every
attnsr op and backend); inside the ops autocast is off, so the statistics and the MLP stay fp32.
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
    _merge_max,
    _through_spatial_gate,
    _tile_offsets,
    check_map_limits,
    empty_map_like,
    gate_apply,
    gate_dx,
    PixelRun,
    no_autocast,
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
    interpreting,
    on_tensor_device,
    refuse_double_backward,
    register_autocast,
    stat_dtype,
)

POOLS = ("avg", "avgmax")


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _channel_stats_kernel(
    X,  # input map (B, C, H, W), any strides
    SUM,  # (B, C, NCH) contiguous ACC: partial Σ_p x over each chunk of pixels
    MAX,  # (B, C, NCH) contiguous ACC: partial max over the chunk (WITH_MAX)
    ARG,  # (B, C, NCH) contiguous int32: first pixel attaining that max (WITH_MAX)
    sx_b, sx_c, sx_h, sx_w,  # x strides (elements)
    C, HW, W,  # channels, pixels per map, map width
    CHUNK,  # pixels per program (a multiple of BLOCK_P)
    NCH,  # number of chunks = cdiv(HW, CHUNK)
    WITH_MAX: tl.constexpr,  # also compute max and arg-max
    ACC: tl.constexpr,  # accumulator dtype: fp32 (fp64 for fp64 inputs)
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
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


def channel_stats(x: torch.Tensor, with_max: bool):
    """One pass over x: avg (B, C) and, when ``with_max``, max (B, C) and first arg-max pixel (B, C) int32."""
    batch, channels, height, width = x.shape
    hw = height * width
    block_c, block_p, launch = tile_config(x)
    chunk, nch = _chunking(x, block_c, block_p)
    sd = stat_dtype(x.dtype)
    sums = torch.empty((batch, channels, nch), dtype=sd, device=x.device)
    maxes = torch.empty_like(sums) if with_max else sums
    args = torch.empty((batch, channels, nch), dtype=torch.int32, device=x.device) if with_max else sums
    if batch > 0:
        grid = (nch, triton.cdiv(channels, block_c), batch)
        run = PixelRun(width, x)
        _channel_stats_kernel[grid](
            x, sums, maxes, args, *run.strides(x), channels, hw, run.width, chunk, nch,
            WITH_MAX=with_max, ACC=acc_dtype(x.dtype), BLOCK_C=block_c, BLOCK_P=block_p, **launch,
        )
    avg = sums.sum(-1) / hw
    if not with_max:
        return avg, None, None
    # first chunk attaining the maximum (torch.argmax returns the first), then its arg-max pixel
    which = maxes.argmax(-1, keepdim=True)
    return avg, maxes.gather(-1, which).squeeze(-1), args.gather(-1, which).squeeze(-1)


def channel_dot(dy: torch.Tensor, x: torch.Tensor, *, s=None, dpool=None, sarg=None) -> torch.Tensor:
    """One pass over dy and x: Σ_p g1 · x per (b, c), (B, C) in the statistics dtype.

    g1 = dy, or with ``s``/``dpool``/``sarg`` the gradient at the channel-gated map of cbam_gate.
    """
    batch, channels, height, width = x.shape
    block_c, block_p, launch = tile_config(x)
    chunk, nch = _chunking(x, block_c, block_p)
    out = torch.empty((batch, channels, nch), dtype=stat_dtype(x.dtype), device=x.device)
    if batch > 0:
        spatial = s is not None
        grid = (nch, triton.cdiv(channels, block_c), batch)
        run = PixelRun(width, dy, x)
        _channel_dot_kernel[grid](
            dy, x, out, s if spatial else out, dpool if spatial else out, sarg if spatial else out,
            *run.strides(dy), *run.strides(x), channels, height * width, run.width, chunk, nch,
            SPATIAL=spatial, ACC=acc_dtype(x.dtype), BLOCK_C=block_c, BLOCK_P=block_p, **launch,
        )
    return out.sum(-1)


# The MLP on the pooled statistics: (B, C) tensors, in PyTorch (see the header).


def _mlp(s, w1, b1, w2, b2):
    """Returns (z, pre) with pre = w1 · s + b1 and z = w2 · relu(pre) + b2, batched over rows of s."""
    pre = s @ w1.t()
    if b1 is not None:
        pre = pre + b1
    z = pre.relu() @ w2.t()
    if b2 is not None:
        z = z + b2
    return z, pre


def _mlp_backward(dz, s, pre, w1, w2):
    """Gradients of z = mlp(s) given dz: (ds, dw1, db1, dw2, db2)."""
    dw2 = dz.t() @ pre.relu()
    db2 = dz.sum(0)
    dpre = (dz @ w2) * (pre > 0)
    dw1 = dpre.t() @ s
    db1 = dpre.sum(0)
    return dpre @ w1, dw1, db1, dw2, db2


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
    """Pass 1 over x (pooled statistics), then the MLP and the sigmoid: the gate ca (B, C)."""
    avg, mx, arg = channel_stats(x, with_max=pool == "avgmax")
    sd = avg.dtype
    w1, b1, w2, b2 = (None if t is None else t.to(sd) for t in (w1, b1, w2, b2))
    z = _mlp(avg, w1, b1, w2, b2)[0]
    if mx is not None:
        z = z + _mlp(mx, w1, b1, w2, b2)[0]
    return ChannelState(torch.sigmoid(z), avg, mx, arg)


def channel_gate_backward(dca, state: ChannelState, w1, b1, w2, b2, hw: int):
    """From dca = Σ_p g1·x (B, C) back through the sigmoid and the MLP.

    Returns gpool (B, 2, C) — [0] gradient per element through the mean (÷ HW), [1] through the
    max (zero for pool="avg") — and the gradients of w1, b1, w2, b2 (None for absent biases).
    """
    sd = dca.dtype
    w1c, b1c, w2c, b2c = (None if t is None else t.to(sd) for t in (w1, b1, w2, b2))
    ca = state.ca
    dz = dca * ca * (1 - ca)
    branches = [state.avg] if state.mx is None else [state.avg, state.mx]
    gpool = torch.zeros((dca.shape[0], 2, dca.shape[1]), dtype=sd, device=dca.device)
    grads = None
    for i, s in enumerate(branches):
        pre = _mlp(s, w1c, b1c, w2c, b2c)[1]
        ds, *g = _mlp_backward(dz, s, pre, w1c, w2c)
        gpool[:, i] = ds / hw if i == 0 else ds
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
    dw1, db1, dw2, db2 = grads
    return gpool, (
        dw1.to(w1.dtype),
        None if b1 is None else db1.to(b1.dtype),
        dw2.to(w2.dtype),
        None if b2 is None else db2.to(b2.dtype),
    )


# ----------------------------------------------------------------------------------------------
# Autograd and torch.compile: two torch.library custom ops with fake (meta) kernels
# ----------------------------------------------------------------------------------------------


def weight_grad_outputs(wgrads, w1, b1, w2, b2):
    """(dw1, db1, dw2, db2) as custom-op outputs: an empty (0,) tensor for an absent bias."""
    dw1, db1, dw2, db2 = wgrads
    return dw1, absent_output(w1) if db1 is None else db1, dw2, absent_output(w2) if db2 is None else db2


def fake_weight_grads(w1, b1, w2, b2):
    """Fake (meta) weight gradients: contiguous, like the real ones (matmul results)."""
    return (w1.new_empty(w1.shape), absent_output(w1) if b1 is None else b1.new_empty(b1.shape),
            w2.new_empty(w2.shape), absent_output(w2) if b2 is None else b2.new_empty(b2.shape))


@torch.library.custom_op("attnsr::channel_gate", mutates_args=())
@on_tensor_device
def _channel_gate_op(
    x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
    pool: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward passes 1 and 2: y and the statistics of ChannelState.outputs()."""
    with no_autocast(x):
        state = channel_gate_state(x, w1, b1, w2, b2, pool)
        y = gate_apply(x, ca=state.ca)
    return (y, *state.outputs())


@_channel_gate_op.register_fake
def _(x, w1, b1, w2, b2, pool):
    return (empty_map_like(x), *ChannelState.fake_outputs(x, pool))


@torch.library.custom_op("attnsr::channel_gate_backward", mutates_args=())
@on_tensor_device
def _channel_gate_backward_op(
    dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
    b2: Optional[torch.Tensor], ca: torch.Tensor, avg: torch.Tensor, mx: torch.Tensor, arg: torch.Tensor,
    pool: str, need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward passes 1 and 2: (dx, dw1, db1, dw2, db2); dx and absent biases' gradients are empty (0,)."""
    state = ChannelState.from_outputs(ca, avg, mx, arg, pool)
    with no_autocast(x):
        dca = channel_dot(dy, x)
        gpool, wgrads = channel_gate_backward(dca, state, w1, b1, w2, b2, x.shape[2] * x.shape[3])
        dx = gate_dx(dy, x, ca=ca, gpool=gpool, carg=state.arg) if need_dx else absent_output(x)
    return (dx, *weight_grad_outputs(wgrads, w1, b1, w2, b2))


@_channel_gate_backward_op.register_fake
def _(dy, x, w1, b1, w2, b2, ca, avg, mx, arg, pool, need_dx):
    return (empty_map_like(x) if need_dx else absent_output(x), *fake_weight_grads(w1, b1, w2, b2))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, pool = inputs
    stats = output[1:]
    ctx.mark_non_differentiable(*stats)
    ctx.save_for_backward(x, w1, b1, w2, b2, *stats)
    ctx.pool = pool


def _backward(ctx, dy, *_stat_grads):
    need = ctx.needs_input_grad[:5]
    grads = _channel_gate_backward_op(dy, *ctx.saved_tensors, ctx.pool, need[0])
    return (*(g if n else None for g, n in zip(grads, need)), None)


_channel_gate_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast(_channel_gate_op, "channel_gate")
refuse_double_backward(_channel_gate_backward_op, "channel_gate")


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
    check_pool(op, pool)
    x, w1, b1, w2, b2 = prepare_inputs(op, x, w1, b1, w2, b2)
    check_channel_mlp(op, x, w1, b1, w2, b2)
    check_map_limits(op, x)
    check_runnable(op, x.device)
    return _channel_gate_op(x, w1, b1, w2, b2, pool)[0]
