"""Channel attention gate (SE / RCAN; CBAM's channel half), fused forward and backward.

Maths. For x: (B, C, H, W), with p = h·W + w the flat pixel index and HW = H·W:
    avg[b, c] = Σ_p x[b, c, p] / HW,   max[b, c] = x[b, c, carg[b, c]]  (carg: first arg-max pixel)
    mlp(s)    = w2 · act(w1 · s + b1) + b2           w1: (C/r, C), w2: (C, C/r), biases optional,
                                                     act ReLU (the default), GELU (erf) or SiLU
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

Launches: forward 2 (statistics, apply), backward 3 (channel dot, the MLP's backward with the
weight gradients, dx), no PyTorch op (tests/test_gating_launches.py counts them). The kernels are
those of every gating op, in _gating.py (``gate_forward`` and ``gate_backward`` with the channel
gate on): the reduction over pixels is split into chunks of pixels, and the last program of each
batch element merges the chunks in order and runs the MLP and the sigmoid as the statistics'
epilogue. No float atomics: results are bitwise reproducible.

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

from ._gating import (
    ACTS,
    EagerOp,
    GateState,
    call_gate,
    check_map_limits,
    empty_map_like,
    fake_channel_outputs,
    fake_weight_grads,
    gate_backward,
    gate_forward,
    prepare_inputs,
    register_gate_op,
    repeat_call,
    weight_grad_outputs,
)
from ._runtime import (
    absent_output,
    check_rank,
    check_runnable,
    check_same,
    check_tensor,
    on_tensor_device,
    ValidCalls,
)

POOLS = ("avg", "avgmax")


# ----------------------------------------------------------------------------------------------
# Autograd and torch.compile: two torch.library custom ops with fake (meta) kernels
# ----------------------------------------------------------------------------------------------


def _channel_gate_forward(
    x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
    pool: str, act: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward (two launches): y and the channel gate's statistics (ca, avg, mx, carg)."""
    y, state = gate_forward(x, mlp=(w1, b1, w2, b2), pool=pool, act=act)
    return (y, *state.channel_outputs())


_channel_gate_op = torch.library.custom_op("attnsr::channel_gate", mutates_args=())(
    on_tensor_device(_channel_gate_forward))


@_channel_gate_op.register_fake
def _(x, w1, b1, w2, b2, pool, act):
    return (empty_map_like(x), *fake_channel_outputs(x, pool))


def _channel_gate_backward(
    dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
    b2: Optional[torch.Tensor], ca: torch.Tensor, avg: torch.Tensor, mx: torch.Tensor, arg: torch.Tensor,
    pool: str, act: str, need_dx: bool, need_w: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dx, dw1, db1, dw2, db2); what is not needed and absent biases' gradients are empty (0,)."""
    state = GateState.from_outputs(pool, channel=(ca, avg, mx, arg))
    dx, wgrads, _ = gate_backward(dy, x, state, mlp=(w1, b1, w2, b2), need_dx=need_dx, need_w=need_w, act=act)
    return (absent_output(x) if dx is None else dx, *weight_grad_outputs(wgrads, w1, b1, w2, b2))


_channel_gate_backward_op = torch.library.custom_op("attnsr::channel_gate_backward", mutates_args=())(
    on_tensor_device(_channel_gate_backward))


@_channel_gate_backward_op.register_fake
def _(dy, x, w1, b1, w2, b2, ca, avg, mx, arg, pool, act, need_dx, need_w=True):
    return (empty_map_like(x) if need_dx else absent_output(x), *fake_weight_grads(w1, b1, w2, b2, need_w))


_EAGER = EagerOp("channel_gate", _channel_gate_forward, _channel_gate_backward, _channel_gate_op, 5, mlp=slice(1, 5))
register_gate_op(_EAGER, _channel_gate_backward_op)
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


def check_act(op: str, act) -> None:
    if act not in ACTS:
        raise ValueError(f"{op}: act={act!r}; expected one of {', '.join(repr(a) for a in ACTS)}")


def channel_gate(x, w1, b1, w2, b2, *, pool="avg", act="relu"):
    """y = x · sigmoid(mlp(avgpool x)) (pool="avg"), or x · sigmoid(mlp(avg) + mlp(max)) (pool="avgmax").

    x: (B, C, H, W), any strides. mlp(s) = w2 · act(w1 · s + b1) + b2 with w1: (C//r, C),
    w2: (C, C//r), b1: (C//r,) or None, b2: (C,) or None, all of x's dtype and device; act "relu"
    (SE, RCAN, CBAM), "gelu" (nn.GELU's erf form) or "silu".
    Returns (B, C, H, W) in x's dtype, channels_last when x has channels innermost.
    """
    op = "channel_gate"
    (x, w1, b1, w2, b2), sig, seen = repeat_call(_CALLS, op, (x, w1, b1, w2, b2), (pool, act))
    if not seen:
        check_pool(op, pool)
        check_act(op, act)
        x, w1, b1, w2, b2 = prepare_inputs(op, x, w1, b1, w2, b2)
        check_channel_mlp(op, x, w1, b1, w2, b2)
        check_map_limits(op, x)
        check_runnable(op, x.device)
        _CALLS.remember(sig, True)
    return call_gate(_EAGER, (x, w1, b1, w2, b2), (pool, act))
