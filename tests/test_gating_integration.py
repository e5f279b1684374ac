"""The gating ops as torch.library custom ops: torch.library.opcheck on every forward and backward
op, torch.compile(fullgraph=True) fwd+bwd, autocast, and the errors for double backward and
forward-mode AD. The ops' numerics are tested in test_channel_gate.py and its siblings."""

import importlib

import pytest
import torch
from conftest import DEVICE, needs_gpu
from gating_checks import check_op, conv_weights, feature_map, leaf, mlp_weights
from tolerances import REL_TOL, rel_error

from attnsr.kernels import cbam_gate, channel_gate, layer_fusion, spatial_gate
from attnsr.kernels.reference import cbam_gate_ref, channel_gate_ref, layer_fusion_ref, spatial_gate_ref

cg = importlib.import_module("attnsr.kernels.channel_gate")
sg = importlib.import_module("attnsr.kernels.spatial_gate")
cb = importlib.import_module("attnsr.kernels.cbam")
lf = importlib.import_module("attnsr.kernels.layer_fusion")


# Each public op as fn(*inputs), its float64 reference ref(*inputs), and fresh inputs of a dtype
# (every tensor requires grad; None biases pass through).
def _channel_inputs(dtype):
    return [feature_map((2, 6, 5, 7), dtype), *mlp_weights(6, 2, dtype)]


def _spatial_inputs(dtype):
    return [feature_map((2, 6, 5, 7), dtype), *conv_weights(3, dtype)]


def _cbam_inputs(dtype):
    return [feature_map((2, 6, 5, 7), dtype), *mlp_weights(6, 2, dtype), *conv_weights(3, dtype)]


def _fusion_inputs(dtype):
    return [leaf((2, 3), dtype), *(leaf((2, 6, 5, 7), dtype) for _ in range(3))]


CASES = {
    "channel_gate": (
        lambda *a: channel_gate(*a, pool="avgmax"),
        lambda *a: channel_gate_ref(*a, pool="avgmax"),
        _channel_inputs,
    ),
    "spatial_gate": (spatial_gate, spatial_gate_ref, _spatial_inputs),
    "cbam_gate": (
        lambda *a: cbam_gate(*a, pool="avgmax"),
        lambda *a: cbam_gate_ref(*a, pool="avgmax"),
        _cbam_inputs,
    ),
    "layer_fusion": (
        lambda w, *maps: layer_fusion(list(maps), w),
        lambda w, *maps: layer_fusion_ref(list(maps), w),
        _fusion_inputs,
    ),
}


# ----------------------------------------------------------------------------------------------
# opcheck: schema, autograd registration, fake kernels (shapes, dtypes, strides), AOT dispatch
# ----------------------------------------------------------------------------------------------


def _assert_opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert all(r == "SUCCESS" for r in result.values()), f"{op}: {result}"


def _detached(tensors):
    return [t.detach() if isinstance(t, torch.Tensor) else t for t in tensors]


def _opcheck_pair(fwd, bwd, tensors, extra, needs=((True,), (False,))):
    """opcheck fwd(*tensors, *extra) (inputs requiring grad), then bwd(dy, *tensors, *saved, *extra, *need)
    on detached inputs (the backward op has no derivative) for each ``need`` of ``needs`` (need_dx,
    and for the ops with an MLP need_w)."""
    _assert_opcheck(fwd, (*tensors, *extra))
    plain = _detached(tensors)
    y, *saved = fwd(*plain, *extra)
    dy = torch.randn_like(y)
    for need in needs:
        _assert_opcheck(bwd, (dy, *plain, *saved, *extra, *need))


MLP_NEEDS = ((True, True), (False, True), (True, False))  # (need_dx, need_w)


@pytest.mark.parametrize(("pool", "biases", "channels_last", "act"),
                         [("avg", True, False, "relu"), ("avgmax", False, True, "gelu")])
def test_channel_gate_opcheck(pool, biases, channels_last, act):
    x = feature_map((2, 6, 5, 7), torch.float32, channels_last=channels_last)
    tensors = [x, *mlp_weights(6, 2, torch.float32, biases=biases)]
    _opcheck_pair(cg._channel_gate_op, cg._channel_gate_backward_op, tensors, (pool, act), MLP_NEEDS)


@pytest.mark.parametrize(("k", "bias", "channels_last"), [(3, True, False), (5, False, True)])
def test_spatial_gate_opcheck(k, bias, channels_last):
    x = feature_map((2, 6, 5, 7), torch.float32, channels_last=channels_last)
    tensors = [x, *conv_weights(k, torch.float32, bias=bias)]
    _opcheck_pair(sg._spatial_gate_op, sg._spatial_gate_backward_op, tensors, ())


@pytest.mark.parametrize(("pool", "biases", "channels_last"), [("avg", True, False), ("avgmax", False, True)])
def test_cbam_gate_opcheck(pool, biases, channels_last):
    x = feature_map((2, 6, 5, 7), torch.float32, channels_last=channels_last)
    tensors = [x, *mlp_weights(6, 2, torch.float32, biases=biases), *conv_weights(3, torch.float32, bias=biases)]
    _opcheck_pair(cb._cbam_gate_op, cb._cbam_gate_backward_op, tensors, (pool,), MLP_NEEDS)


def test_layer_fusion_opcheck():
    """A stacked (L, B, C, H, W) tensor passed as a one-element list, and a list of maps with mixed
    layouts (NCHW, channels_last, a slice view); the backward op for every subset of gradients."""
    base = torch.randn(2, 6, 7, 9, device=DEVICE)
    mixed = [
        leaf((2, 6, 5, 7), torch.float32),
        leaf((2, 6, 5, 7), torch.float32, channels_last=True),
        base[:, :, 1:6, 2:9].requires_grad_(),
    ]
    for maps in ([leaf((3, 2, 6, 5, 7), torch.float32)], mixed):
        n_maps = maps[0].shape[0] if maps[0].dim() == 5 else len(maps)
        weights = leaf((2, n_maps), torch.float32)
        _assert_opcheck(lf._layer_fusion_op, (maps, weights))
        plain, weights = _detached(maps), weights.detach()
        out = lf._layer_fusion_op(plain, weights)
        dout = torch.randn_like(out)
        for need_df, need_dw in ((True, True), (True, False), (False, True)):
            _assert_opcheck(lf._layer_fusion_backward_op, (dout, plain, weights, need_df, need_dw))


# ----------------------------------------------------------------------------------------------
# Reverse mode only: clear errors for double backward and forward-mode AD
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_double_backward_raises(name):
    fn, _, make = CASES[name]
    inputs = make(torch.float64)
    grads = torch.autograd.grad(fn(*inputs).square().sum(), inputs[:2], create_graph=True)
    assert all(g.requires_grad for g in grads)
    with pytest.raises(RuntimeError, match=rf"{name} does not support double backward"):
        grads[0].sum().backward()


@pytest.mark.parametrize("name", list(CASES))
def test_forward_mode_ad_raises(name):
    """torch.func.jvp, and a forward_ad dual tensor in any input (here the second one)."""
    fn, _, make = CASES[name]
    inputs = _detached(make(torch.float64))
    match = rf"{name}: forward-mode AD .* is not supported"
    with pytest.raises(NotImplementedError, match=match):
        torch.func.jvp(lambda a: fn(a, *inputs[1:]), (inputs[0],), (torch.ones_like(inputs[0]),))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(inputs[1], torch.randn_like(inputs[1]))
        with pytest.raises(NotImplementedError, match=match):
            fn(inputs[0], dual, *inputs[2:])


# ----------------------------------------------------------------------------------------------
# Autocast
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_autocast_float16(name):
    """Under torch.autocast(float16), fp32 inputs and weights are cast to fp16 before the op: the
    output is fp16, within fp16 tolerance of the float64 reference on the fp32 inputs, and the fp32
    leaves get fp32 gradients with fp16 accuracy."""
    fn, ref, make = CASES[name]

    def autocast_fn(*a):
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            return fn(*a)

    check_op(autocast_fn, ref, make(torch.float32), torch.float16, f"{name} under autocast")


@pytest.mark.parametrize("name", ["channel_gate", "spatial_gate", "cbam_gate"])
def test_repeated_call_follows_autocast(name):
    """The eager path skips the checks of a call signature seen before, after autocast's cast: an
    fp32 call seen outside autocast still runs in fp16 inside it, and in fp32 after it."""
    fn, _, make = CASES[name]
    inputs = [None if t is None else t.detach() for t in make(torch.float32)]
    assert fn(*inputs).dtype == torch.float32
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        assert fn(*inputs).dtype == torch.float16
    assert fn(*inputs).dtype == torch.float32


@pytest.mark.parametrize(
    ("op", "make"),
    [(cg._channel_gate_op, _channel_inputs), (sg._spatial_gate_op, _spatial_inputs), (cb._cbam_gate_op, _cbam_inputs)],
    ids=["channel_gate", "spatial_gate", "cbam_gate"],
)
def test_op_bodies_ignore_autocast(op, make):
    """The dispatcher runs a custom op's body under the caller's autocast; the bodies switch it
    off, so the fp32 statistics and the MLP are bitwise the same with and without autocast (and
    match the fake kernels' fp32)."""
    extra = {cg._channel_gate_op: ("avgmax", "silu"), cb._cbam_gate_op: ("avgmax",)}.get(op, ())
    args = (*_detached(make(torch.float16)), *extra)
    plain = op(*args)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        cast = op(*args)
    for a, b in zip(plain, cast):
        assert a.dtype == b.dtype and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph breaks, forward and backward
# ----------------------------------------------------------------------------------------------


def _check_compiled(name, backend):
    fn, _, make = CASES[name]
    inputs = make(torch.float32)
    grads_of = [t for t in inputs if t is not None]

    def loss(*a):
        return fn(*a).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(*inputs), grads_of)
    want = torch.autograd.grad(loss(*inputs), grads_of)
    for i, (g, w) in enumerate(zip(got, want)):
        err = rel_error(g, w)
        assert err <= REL_TOL[torch.float32], f"{name} compiled ({backend}): grad of input {i} off by {err:.2e}"


@pytest.mark.parametrize("name", list(CASES))
def test_torch_compile_traces_without_graph_breaks(name):
    """Dynamo + AOTAutograd with the fake kernels (backend aot_eager: no code generation, seconds on CPU)."""
    _check_compiled(name, "aot_eager")


def test_torch_compile_inductor_cbam_gate():
    """Inductor, which asserts at run time that the real op's strides match the fake kernel's
    (about 15 s on CPU: compiles C++ for the glue)."""
    _check_compiled("cbam_gate", "inductor")


@needs_gpu
@pytest.mark.parametrize("name", list(CASES))
def test_torch_compile_inductor(name):
    _check_compiled(name, "inductor")
