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
Launches: forward 2, backward 3, no PyTorch op. The kernels are those of every gating op, in
_gating.py (``gate_forward`` and ``gate_backward`` with the spatial gate on). The convolution and
sigmoid run in the prologue of the apply pass, whose programs own a 2-D block of pixels and all
channels: each computes s of its pixels once and stores it for backward. In backward one small
kernel on the (B, 2, H, W) statistics (2/C of x) computes the transposed convolution together with
per-program partial sums of the weight and bias gradients, summed in a fixed order by the last
program to finish: no float atomics, bitwise reproducible. Eager PyTorch reads x three times
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

from ._gating import (
    EagerOp,
    GateState,
    call_gate,
    check_map_limits,
    conv_grad_outputs,
    empty_map_like,
    fake_conv_grads,
    fake_spatial_outputs,
    gate_backward,
    gate_forward,
    prepare_inputs,
    register_gate_op,
    repeat_call,
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

MAX_KERNEL_SIZE = 15


# ----------------------------------------------------------------------------------------------
# Autograd and torch.compile: two torch.library custom ops with fake (meta) kernels
# ----------------------------------------------------------------------------------------------


def _spatial_gate_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward (two launches): y and the spatial gate's statistics (stats, sarg, s)."""
    y, state = gate_forward(x, conv=(weight, bias))
    return (y, *state.spatial_outputs())


_spatial_gate_op = torch.library.custom_op("attnsr::spatial_gate", mutates_args=())(
    on_tensor_device(_spatial_gate_forward))


@_spatial_gate_op.register_fake
def _(x, weight, bias):
    return (empty_map_like(x), *fake_spatial_outputs(x))


def _spatial_gate_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stats: torch.Tensor,
    sarg: torch.Tensor, s: torch.Tensor, need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward (three launches): (dx, dweight, dbias); dx and an absent bias's gradient are empty (0,)."""
    state = GateState.from_outputs("avg", spatial=(stats, sarg, s))
    dx, _, conv_grads = gate_backward(dy, x, state, conv=(weight, bias), need_dx=need_dx)
    return (absent_output(x) if dx is None else dx, *conv_grad_outputs(conv_grads, weight))


_spatial_gate_backward_op = torch.library.custom_op("attnsr::spatial_gate_backward", mutates_args=())(
    on_tensor_device(_spatial_gate_backward))


@_spatial_gate_backward_op.register_fake
def _(dy, x, weight, bias, stats, sarg, s, need_dx):
    return (empty_map_like(x) if need_dx else absent_output(x), *fake_conv_grads(weight, bias))


_EAGER = EagerOp("spatial_gate", _spatial_gate_forward, _spatial_gate_backward, _spatial_gate_op, 3)
register_gate_op(_EAGER, _spatial_gate_backward_op)
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
