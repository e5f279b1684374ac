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
Launches: forward 3, backward 5 (spatial dot, convolution backward, channel dot with the MLP's
backward, the MLP's weight gradients, dx), no PyTorch op: the MLP runs in the channel statistics'
and channel dot's epilogues, the convolution in the output pass's prologue and a small kernel on
(B, 2, H, W) maps, as in channel_gate.py and spatial_gate.py. No float atomics.

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
    call_gate,
    check_map_limits,
    empty_map_like,
    gate_apply,
    gate_dx,
    prepare_inputs,
    repeat_call,
)
from ._runtime import (
    absent_output,
    check_runnable,
    check_same,
    on_tensor_device,
    refuse_double_backward,
    register_autocast,
    ValidCalls,
)
from .channel_gate import (
    ChannelState,
    channel_gate_backward,
    channel_gate_state,
    check_channel_mlp,
    check_pool,
    fake_weight_grads,
    weight_grad_outputs,
)
from .spatial_gate import (
    check_spatial_conv,
    fake_conv_grads,
    fake_spatial_state,
    spatial_conv_backward,
    spatial_dot,
    spatial_stats,
)

# ----------------------------------------------------------------------------------------------
# Autograd and torch.compile: two torch.library custom ops with fake (meta) kernels
# (the kernels live in _gating.py, channel_gate.py and spatial_gate.py)
# ----------------------------------------------------------------------------------------------


def _cbam_gate_forward(
    x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
    sweight: torch.Tensor, sbias: Optional[torch.Tensor], pool: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """Forward passes 1 to 3: y, the channel statistics (ca, avg, max, carg) and the spatial ones (stats, sarg, s)."""
    state = channel_gate_state(x, w1, b1, w2, b2, pool)  # pass 1 over x, the MLP in its epilogue
    stats, sarg = spatial_stats(x, ca=state.ca)  # pass 2
    y, s = gate_apply(x, ca=state.ca, conv=(stats, sweight, sbias))  # pass 3, the convolution in its prologue
    return (y, *state.outputs(), stats, sarg, s)


_cbam_gate_op = torch.library.custom_op("attnsr::cbam_gate", mutates_args=())(on_tensor_device(_cbam_gate_forward))


@_cbam_gate_op.register_fake
def _(x, w1, b1, w2, b2, sweight, sbias, pool):
    return (empty_map_like(x), *ChannelState.fake_outputs(x, pool), *fake_spatial_state(x))


def _cbam_gate_backward(
    dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
    b2: Optional[torch.Tensor], sweight: torch.Tensor, sbias: Optional[torch.Tensor], ca: torch.Tensor,
    avg: torch.Tensor, mx: torch.Tensor, carg: torch.Tensor, stats: torch.Tensor, sarg: torch.Tensor,
    s: torch.Tensor, pool: str, need_dx: bool, need_w: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward passes 1 to 3: (dx, dw1, db1, dw2, db2, dsweight, dsbias); dx, the MLP's gradients
    (unless ``need_w``) and absent biases' gradients are empty (0,)."""
    channels, height, width = x.shape[1:]
    state = ChannelState.from_outputs(ca, avg, mx, carg, pool)
    dpre = spatial_dot(dy, x, s, ca=ca)  # pass 1 over dy and x
    dpool, dsweight, dsbias = spatial_conv_backward(dpre, stats, sweight, sbias, channels, height, width)
    # pass 2 over dy and x, the MLP's backward in its epilogue; the MLP's weight gradients
    gpool, wgrads = channel_gate_backward(dy, x, state, w1, b1, w2, b2, need_w, s=s, dpool=dpool, sarg=sarg)
    dx = absent_output(x)
    if need_dx:  # pass 3: dy -> dx
        dx = gate_dx(dy, x, ca=ca, gpool=gpool, carg=state.arg, s=s, dpool=dpool, sarg=sarg)
    return (dx, *weight_grad_outputs(wgrads, w1, b1, w2, b2), dsweight,
            absent_output(sweight) if dsbias is None else dsbias)


_cbam_gate_backward_op = torch.library.custom_op("attnsr::cbam_gate_backward", mutates_args=())(
    on_tensor_device(_cbam_gate_backward))


@_cbam_gate_backward_op.register_fake
def _(dy, x, w1, b1, w2, b2, sweight, sbias, ca, avg, mx, carg, stats, sarg, s, pool, need_dx, need_w=True):
    return (empty_map_like(x) if need_dx else absent_output(x), *fake_weight_grads(w1, b1, w2, b2, need_w),
            *fake_conv_grads(sweight, sbias))


def _setup_context(ctx, inputs, output):
    *tensors, pool = inputs
    saved = output[1:]
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics (or an unused y)
    ctx.save_for_backward(*tensors, *saved)
    ctx.pool = pool


def _backward(ctx, dy, *_stat_grads):
    need = ctx.needs_input_grad[:7]
    if dy is None:
        return (None,) * 8
    grads = _cbam_gate_backward_op(dy, *ctx.saved_tensors, ctx.pool, need[0], any(need[1:5]))
    return (*(g if n else None for g, n in zip(grads, need)), None)


_cbam_gate_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast(_cbam_gate_op, "cbam_gate")
refuse_double_backward(_cbam_gate_backward_op, "cbam_gate")


def _eager_backward(dy, saved, extra, need):
    return _cbam_gate_backward(dy, *saved, *extra, need[0], any(need[1:5]))


_EAGER = EagerOp("cbam_gate", _cbam_gate_forward, _eager_backward, _cbam_gate_op)
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
