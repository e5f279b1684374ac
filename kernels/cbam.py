"""CBAM gate: the channel gate then the spatial gate, fused so that x · ca never exists.

Maths. With ca = channel gate of x (kernels/channel_gate.py: pooled statistics of x, shared MLP,
sigmoid) and x1 = x · ca[b, c] the channel-gated map,
    s = sigmoid(conv2d([mean_c x1, max_c x1], sweight, sbias, padding k//2)),   y = x1 · s[b, p]
so y = x · ca[b, c] · s[b, p]. x1 is never written: its per-pixel statistics are taken from x and
ca on the fly, and the output pass multiplies x by both gates at once. Backward recomputes x1 from
x and ca where it needs it:
    dpre  = (Σ_c dy · x · ca) · s · (1 − s)                          per pixel
    d_mean, d_max, dsweight, dsbias  from dpre (the 2→1 convolution transposed)
    g1    = dy · s + d_mean / C + [c = sarg] · d_max                  gradient at x1 (not stored)
    dca   = Σ_p g1 · x                                                per (b, c)
    back through the channel gate's sigmoid and MLP → w1, b1, w2, b2 gradients and the pooled
    gradients ds_avg, ds_max
    dx    = g1 · ca + ds_avg / HW + [p = carg] · ds_max
Max pools route their gradient to one element, the first attaining the maximum (lowest pixel for
the channel gate's max over pixels, lowest channel for the spatial gate's max over channels).

Passes over x-sized tensors (each read or write of a (B, C, H, W) map counts one):
    forward   3 reads, 1 write: (1) x → per-(b, c) sum, max, arg-max;  (2) x, ca → per-pixel mean,
              max, arg-max channel of x · ca;  (3) x → y = x · ca · s
    backward  5 reads, 1 write: (1) dy, x → dpre;  (2) dy, x → dca;  (3) dy → dx
    saved for backward: x, per-(b, c) statistics (ca, avg, max: fp32; carg: int32) and per-(b, h, w)
    statistics ([mean, max] and s: fp32; sarg: int32). Not x · ca.
Eager PyTorch (channel gate, then spatial gate) reads x or x · ca five times (six with
pool="avgmax") and writes x · ca and y in the forward, and keeps x · ca for backward.
Launches: forward 3, backward 5 (spatial dot, convolution backward, channel dot, the MLP's
backward with the weight gradients, dx), no PyTorch op. The kernels are those of every gating op,
in _gating.py (``gate_forward`` and ``gate_backward`` with both gates on): the MLP runs in the
channel statistics' epilogue and the convolution in the apply pass's prologue, as in the channel
and spatial ops. No float atomics.

Registration: ``attnsr::cbam_gate`` (the three forward passes; returns y and both gates'
statistics) and ``attnsr::cbam_gate_backward`` (the three backward passes), torch.library custom
ops with fake kernels, autocast and reverse-mode-only rules as in channel_gate.py.

Limits and precision: those of channel_gate and spatial_gate (any strides, channels_last kept,
k odd ≤ 15, fp32 statistics and gates, float64 for float64 inputs).
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
    fake_channel_outputs,
    fake_conv_grads,
    fake_spatial_outputs,
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
    check_runnable,
    check_same,
    on_tensor_device,
    ValidCalls,
)
from .channel_gate import check_channel_mlp, check_pool
from .spatial_gate import check_spatial_conv

# ----------------------------------------------------------------------------------------------
# Autograd and torch.compile: two torch.library custom ops with fake (meta) kernels
# ----------------------------------------------------------------------------------------------


def _cbam_gate_forward(
    x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
    sweight: torch.Tensor, sbias: Optional[torch.Tensor], pool: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """Forward (three launches): y, the channel statistics (ca, avg, mx, carg) and the spatial ones (stats, sarg, s)."""
    y, state = gate_forward(x, mlp=(w1, b1, w2, b2), conv=(sweight, sbias), pool=pool)
    return (y, *state.channel_outputs(), *state.spatial_outputs())


_cbam_gate_op = torch.library.custom_op("attnsr::cbam_gate", mutates_args=())(on_tensor_device(_cbam_gate_forward))


@_cbam_gate_op.register_fake
def _(x, w1, b1, w2, b2, sweight, sbias, pool):
    return (empty_map_like(x), *fake_channel_outputs(x, pool), *fake_spatial_outputs(x))


def _cbam_gate_backward(
    dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
    b2: Optional[torch.Tensor], sweight: torch.Tensor, sbias: Optional[torch.Tensor], ca: torch.Tensor,
    avg: torch.Tensor, mx: torch.Tensor, carg: torch.Tensor, stats: torch.Tensor, sarg: torch.Tensor,
    s: torch.Tensor, pool: str, need_dx: bool, need_w: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward (five launches): (dx, dw1, db1, dw2, db2, dsweight, dsbias); dx, the MLP's gradients
    (unless ``need_w``) and absent biases' gradients are empty (0,)."""
    state = GateState.from_outputs(pool, channel=(ca, avg, mx, carg), spatial=(stats, sarg, s))
    dx, wgrads, conv_grads = gate_backward(dy, x, state, mlp=(w1, b1, w2, b2), conv=(sweight, sbias),
                                           need_dx=need_dx, need_w=need_w)  # CBAM's MLP: ReLU
    return (absent_output(x) if dx is None else dx, *weight_grad_outputs(wgrads, w1, b1, w2, b2),
            *conv_grad_outputs(conv_grads, sweight))


_cbam_gate_backward_op = torch.library.custom_op("attnsr::cbam_gate_backward", mutates_args=())(
    on_tensor_device(_cbam_gate_backward))


@_cbam_gate_backward_op.register_fake
def _(dy, x, w1, b1, w2, b2, sweight, sbias, ca, avg, mx, carg, stats, sarg, s, pool, need_dx, need_w=True):
    return (empty_map_like(x) if need_dx else absent_output(x), *fake_weight_grads(w1, b1, w2, b2, need_w),
            *fake_conv_grads(sweight, sbias))


_EAGER = EagerOp("cbam_gate", _cbam_gate_forward, _cbam_gate_backward, _cbam_gate_op, 7, mlp=slice(1, 5))
register_gate_op(_EAGER, _cbam_gate_backward_op)
_CALLS = ValidCalls()


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def cbam_gate(x, w1, b1, w2, b2, sweight, sbias, *, pool="avgmax"):
    """spatial_gate(channel_gate(x, w1, b1, w2, b2, pool=pool), sweight, sbias), fused.

    x: (B, C, H, W), any strides. Channel MLP: w1 (C//r, C), b1 (C//r,) or None, w2 (C, C//r),
    b2 (C,) or None; pool "avgmax" (CBAM's, the default) or "avg" (SE). Spatial convolution: sweight (1, 2, k, k)
    with k odd, sbias (1,) or None. All of x's dtype and device. Returns (B, C, H, W) in x's dtype,
    channels_last when x has channels innermost.
    """
    op = "cbam_gate"
    (x, w1, b1, w2, b2, sweight, sbias), sig, seen = repeat_call(_CALLS, op, (x, w1, b1, w2, b2, sweight, sbias),
                                                                 (pool,))
    if not seen:
        check_pool(op, pool)
        x, w1, b1, w2, b2, sweight, sbias = prepare_inputs(op, x, w1, b1, w2, b2, sweight, sbias)
        tensors = check_channel_mlp(op, x, w1, b1, w2, b2)
        tensors.update(check_spatial_conv(op, x, sweight, sbias, names=("sweight", "sbias")))
        check_same(op, tensors)
        check_map_limits(op, x)
        check_runnable(op, x.device)
        _CALLS.remember(sig, True)
    return call_gate(_EAGER, (x, w1, b1, w2, b2, sweight, sbias), (pool,))
