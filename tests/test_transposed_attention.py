"""transposed_attention (Restormer's MDTA) against the float64 reference: the output and the
gradients of q, k, v and the temperature, on odd shapes and layouts, in every dtype the device runs."""

import importlib

import pytest
import torch
from conftest import DEVICE, ON_GPU
from gating_checks import LaunchLog, check_op, draw, leaf
from tolerances import REL_TOL, assert_close_rel

from attnsr.kernels import transposed_attention, transposed_attention_qkv
from attnsr.kernels.reference import transposed_attention_ref

ta_module = importlib.import_module("attnsr.kernels.transposed_attention")


def _temperature(heads, dtype, shape=None):
    """τ per head in [0.5, 1.5] (Restormer starts at 1 and learns it)."""
    t = (torch.rand(heads, dtype=torch.float64) + 0.5).to(DEVICE).to(dtype)
    return t.reshape(shape or (heads, 1, 1)).requires_grad_()


def _fn(heads):
    return lambda q, k, v, t: transposed_attention(q, k, v, t, heads=heads)


def _ref(heads):
    return lambda q, k, v, t: transposed_attention_ref(q, k, v, t, heads=heads)


# (B, C, H, W, heads): d = 12 (heads 1, C 12), d = 4 (heads 3: padded to 16), d = 48 (Restormer's),
# d = 20; H·W = 35, 143, 81, 64 + 1: not multiples of the token block, and one split's worth and more.
SHAPES = [(1, 12, 7, 5, 1), (2, 12, 13, 11, 3), (1, 48, 9, 9, 1), (2, 40, 5, 13, 2)]
DTYPES = [torch.float32, torch.float16, torch.float64] + ([torch.bfloat16] if ON_GPU else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_transposed_attention_matches_reference(shape, dtype):
    *dims, heads = shape
    q, k, v = (leaf(tuple(dims), dtype) for _ in range(3))
    check_op(_fn(heads), _ref(heads), [q, k, v, _temperature(heads, dtype)], dtype, f"{shape} {dtype}")


def test_bf16_storage_under_the_interpreter():
    """bf16 loads, stores and roundings (the interpreter's bf16 dot is replaced by fp32 operands)."""
    q, k, v = (leaf((1, 24, 6, 7), torch.bfloat16) for _ in range(3))
    check_op(_fn(2), _ref(2), [q, k, v, _temperature(2, torch.bfloat16)], torch.bfloat16, "bf16")


@pytest.mark.parametrize("layout", ["qkv_view", "channels_last", "qkv_channels_last", "crop"])
def test_layouts(layout):
    """Views of one (B, 3C, H, W) depthwise-conv output (Restormer's chunk), channels_last maps,
    a cropped view with row strides; an upstream gradient with stride 0. Output in q's layout."""
    b, c, h, w, heads = 2, 24, 6, 9, 2
    if layout.startswith("qkv"):
        qkv = draw(b, 3 * c, h, w).float()
        if layout == "qkv_channels_last":
            qkv = qkv.contiguous(memory_format=torch.channels_last)
        qkv.requires_grad_()
        q, k, v = qkv.chunk(3, dim=1)
    elif layout == "channels_last":
        q, k, v = (leaf((b, c, h, w), torch.float32, channels_last=True) for _ in range(3))
    else:
        q, k, v = (draw(b, c, h + 2, w + 3).float()[:, :, 1:-1, 2:-1].requires_grad_() for _ in range(3))
    grad = torch.ones(1, 1, 1, 1, device=DEVICE).expand(b, c, h, w)
    t = _temperature(heads, torch.float32)
    out, _ = check_op(_fn(heads), _ref(heads), [q, k, v, t], torch.float32, layout)
    check_op(_fn(heads), _ref(heads), [q, k, v, t], torch.float32, f"{layout}, stride-0 grad", grad=grad)
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout.endswith("channels_last"))


def test_one_pixel_map():
    """A 1×1 map: each normalised channel is ±1, so dq and dk vanish (a projection onto a
    one-dimensional space); they must come out at rounding level, the rest within tolerance."""
    q, k, v = (leaf((2, 6, 1, 1), torch.float32) for _ in range(3))
    t = _temperature(2, torch.float32, (2,))
    out = transposed_attention(q, k, v, t, heads=2)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v, t)]
    expect = transposed_attention_ref(*ref_in, heads=2)
    assert_close_rel(out, expect, torch.float32, "1×1 output")
    g = draw(out.shape).float()
    got = torch.autograd.grad(out, (q, k, v, t), g)
    want = torch.autograd.grad(expect, ref_in, g.double())
    for name, a in (("dq", got[0]), ("dk", got[1])):
        assert a.abs().max() < 1e-6 * g.abs().max(), f"1×1 {name}: {a.abs().max():.3e}, expected ~0"
    assert_close_rel(got[2], want[2], torch.float32, "1×1 dv")
    assert_close_rel(got[3], want[3], torch.float32, "1×1 dτ")


def test_zero_channel_takes_the_eps_branch():
    """A channel of q (and one of k) that is all zeros: F.normalize divides it by eps, its cosines
    are 0 and its gradient has no projection term."""
    q, k, v = (draw(2, 12, 5, 7).float() for _ in range(3))
    q[0, 3] = 0
    k[1, 7] = 0
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    check_op(_fn(2), _ref(2), [q, k, v, _temperature(2, torch.float32)], torch.float32, "zero channel")


def test_deterministic():
    """Two runs are bitwise equal: split partials and the batch sum of dτ in a fixed order."""
    q, k, v = (leaf((2, 16, 9, 11), torch.float32) for _ in range(3))  # two token splits per (b, h)
    t = _temperature(2, torch.float32)
    g = draw(2, 16, 9, 11).float()
    runs = []
    for _ in range(2):
        out = transposed_attention(q, k, v, t, heads=2)
        runs.append((out, *torch.autograd.grad(out, (q, k, v, t), g)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_gradient_subsets_and_gradcheck():
    q, k, v = (leaf((1, 4, 3, 5), torch.float64) for _ in range(3))
    t = _temperature(2, torch.float64)
    assert torch.autograd.gradcheck(_fn(2), (q, k, v, t), fast_mode=True)
    out = transposed_attention(q, k.detach(), v, t.detach(), heads=2)
    (dv,) = torch.autograd.grad(out, v, torch.ones_like(out))
    ref = transposed_attention_ref(q, k, v, t, heads=2)
    torch.testing.assert_close(dv, torch.autograd.grad(ref, v, torch.ones_like(ref))[0])
    (dt,) = torch.autograd.grad(transposed_attention(q.detach(), k.detach(), v.detach(), t, heads=2).sum(), t)
    ref = transposed_attention_ref(q, k, v, t, heads=2)
    torch.testing.assert_close(dt, torch.autograd.grad(ref.sum(), t)[0])


def test_launch_counts(monkeypatch):
    """Forward: statistics, softmax, apply (3 launches); backward: dA partials, finalize, apply (3)."""
    log = LaunchLog(monkeypatch, [ta_module])
    q, k, v = (leaf((2, 12, 6, 5), torch.float32) for _ in range(3))
    out = transposed_attention(q, k, v, _temperature(3, torch.float32), heads=3)
    assert len(log.launches) == 3
    log.clear()
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert len(log.launches) == 3


def test_custom_ops_pass_opcheck():
    from attnsr.kernels.transposed_attention import _transposed_attention_backward_op, _transposed_attention_op

    qkv = torch.randn(2, 3 * 8, 4, 6, device=DEVICE, requires_grad=True)
    q, k, v = qkv.chunk(3, dim=1)
    t = _temperature(2, torch.float32)
    result = torch.library.opcheck(_transposed_attention_op, (q, k, v, t, 2))
    assert all(r == "SUCCESS" for r in result.values()), result
    q, k, v, t = (x.detach() for x in (q, k, v, t))
    out, *stats = _transposed_attention_op(q, k, v, t, 2)
    do = torch.randn_like(out)
    for need in ((True, True, True), (False, True, False), (True, False, True)):
        result = torch.library.opcheck(_transposed_attention_backward_op, (do, q, k, v, t, *stats, 2, *need))
        assert all(r == "SUCCESS" for r in result.values()), result


def test_torch_compile_fullgraph():
    def f(qkv, t):
        return transposed_attention(*qkv.chunk(3, dim=1), t, heads=2).square().sum()

    qkv = torch.randn(2, 3 * 8, 5, 6, device=DEVICE, requires_grad=True)
    t = _temperature(2, torch.float32)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if not ON_GPU else "inductor")
    got = torch.autograd.grad(compiled(qkv, t), (qkv, t))
    want = torch.autograd.grad(f(qkv, t), (qkv, t))
    for g, w in zip(got, want):
        assert_close_rel(g, w, torch.float32, "compiled gradient")


def test_autocast():
    dtype = torch.float16 if ON_GPU else torch.bfloat16
    qkv = draw(1, 3 * 16, 6, 6).float().requires_grad_()
    t = _temperature(2, torch.float32)
    with torch.autocast(DEVICE.type, dtype=dtype):
        out = transposed_attention(*qkv.chunk(3, dim=1), t, heads=2)
        direct = torch.ops.attnsr.transposed_attention(*qkv.chunk(3, dim=1), t, 2)[0]
    assert out.dtype == dtype and direct.dtype == dtype
    expect = transposed_attention_ref(*qkv.chunk(3, dim=1), t, heads=2, upcast=True)
    assert_close_rel(out, expect, dtype, "autocast output")
    g = torch.autograd.grad(out.float().sum(), (qkv, t))
    w = torch.autograd.grad(expect.sum(), (qkv, t))
    assert g[0].dtype == torch.float32 and g[1].dtype == torch.float32
    assert_close_rel(g[0], w[0], dtype, "autocast d(qkv)")
    assert_close_rel(g[1], w[1], dtype, "autocast dτ")


def test_double_backward_refused():
    q, k, v = (leaf((1, 4, 3, 3), torch.float32) for _ in range(3))
    out = transposed_attention(q, k, v, _temperature(1, torch.float32), heads=1)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="transposed_attention does not support double backward"):
        dq.sum().backward()


def test_bad_input():
    q, k, v = (leaf((2, 12, 4, 5), torch.float32) for _ in range(3))
    t = _temperature(3, torch.float32)
    with pytest.raises(ValueError, match=r"q is \(2, 12, 4, 5\) but k is \(2, 12, 4, 6\)"):
        transposed_attention(q, leaf((2, 12, 4, 6), torch.float32), v, t, heads=3)
    with pytest.raises(ValueError, match=r"C = 12 channels do not split into heads = 5"):
        transposed_attention(q, k, v, t, heads=5)
    with pytest.raises(ValueError, match=r"temperature is \(2, 1, 1\); expected \(3, 1, 1\)"):
        transposed_attention(q, k, v, _temperature(2, torch.float32), heads=3)
    with pytest.raises(TypeError, match=r"q is torch.float32 but v is torch.float64"):
        transposed_attention(q, k, v.double(), t, heads=3)
    with pytest.raises(TypeError, match=r"heads must be a positive int, got 1.5"):
        transposed_attention(q, k, v, t, heads=1.5)
    with pytest.raises(ValueError, match=r"q has 3 dims, shape \(12, 4, 5\); expected 4 dims"):
        transposed_attention(q[0], k[0], v[0], t, heads=3)
    big = torch.randn(1, 129, 2, 2, device=DEVICE)
    with pytest.raises(ValueError, match=r"= 129 channels per head; expected at most 128"):
        transposed_attention(big, big, big, torch.ones(1, 1, 1, device=DEVICE), heads=1)
    many = torch.randn(32768, 3, 1, 1, device=DEVICE)
    with pytest.raises(ValueError, match=r"B·heads = 32768·3 = 98304; expected at most 65535"):
        transposed_attention(many, many, many, torch.ones(3, device=DEVICE), heads=3)
    with pytest.raises(TypeError, match=r"v has dtype torch.int64"):
        transposed_attention(q, k, v.long(), t, heads=3)


def test_a_repeated_call_skips_the_checks(monkeypatch):
    """A call signature that passed the checks once is not checked again (ValidCalls: shapes,
    strides, dtypes, devices, heads); a new signature is, and its errors still come."""
    calls = []
    check = ta_module._check
    monkeypatch.setattr(ta_module, "_check", lambda *a: calls.append(a) or check(*a))
    qkv = leaf((2, 12, 5, 6), torch.float32)
    tau = leaf((2, 1, 1), torch.float32)
    for _ in range(3):
        transposed_attention_qkv(qkv, tau, heads=2)
    assert len(calls) == 1, f"{len(calls)} checks for three calls of one signature"
    with pytest.raises(ValueError, match=r"C = 4 channels do not split into heads = 3"):
        transposed_attention_qkv(qkv, tau, heads=3)


def test_empty_batch():
    q, k, v = (leaf((0, 8, 3, 4), torch.float32) for _ in range(3))
    t = _temperature(2, torch.float32)
    out = transposed_attention(q, k, v, t, heads=2)
    assert out.shape == (0, 8, 3, 4)
    (dt,) = torch.autograd.grad(out.sum(), t)
    assert torch.equal(dt, torch.zeros_like(t))


def test_tolerance_table_is_the_central_one():
    assert REL_TOL[torch.float32] == 1e-5  # the float32 checks above use the central table unchanged


# ----------------------------------------------------------------------------------------------
# The layer and swap_attention on Restormer's Attention (written here as Restormer writes it)
# ----------------------------------------------------------------------------------------------


class RestormerAttention(torch.nn.Module):
    """Restormer's MDTA ``Attention`` (basicsr/models/archs/restormer_arch.py), copied in its form."""

    def __init__(self, dim, num_heads, bias):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = torch.nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = torch.nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = torch.nn.Conv2d(dim * 3, dim * 3, kernel_size=3, stride=1, padding=1, groups=dim * 3,
                                          bias=bias)
        self.project_out = torch.nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.num_heads, c // self.num_heads, h * w) for t in (q, k, v))
        q = torch.nn.functional.normalize(q, dim=-1)
        k = torch.nn.functional.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        out = attn.softmax(dim=-1) @ v
        return self.project_out(out.reshape(b, c, h, w))


class NotNormalised(RestormerAttention):
    """The same parameters, another function (no L2 normalisation): must be left as it is."""

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.num_heads, c // self.num_heads, h * w) for t in (q, k, v))
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        return self.project_out((attn.softmax(dim=-1) @ v).reshape(b, c, h, w))


def _restormer_like(bias):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 24, 3, padding=1), RestormerAttention(24, 2, bias))
    with torch.no_grad():
        model[1].temperature.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("bias", [False, True])
def test_swap_restormer_attention_float64_equal(bias):
    """swap_attention adopts Restormer's Attention; on the torch backend in float64 the swapped model
    equals the untouched one (output, input gradient, every parameter gradient); on triton it is
    within float64 tolerance. Parameters are adopted (the same objects) and state_dict keys kept."""
    import copy

    import attnsr
    from attnsr.layers import TransposedAttention

    old = _restormer_like(bias).double().to(DEVICE)
    new = attnsr.swap_attention(copy.deepcopy(old), backend="torch")
    assert isinstance(new[1], TransposedAttention)
    assert ("1", "RestormerAttention", "TransposedAttention") in new.attnsr_swapped and not new.attnsr_left
    assert list(new.state_dict()) == list(old.state_dict())
    x = draw(2, 3, 7, 6).requires_grad_()
    outs = []
    for model in (old, new):
        x.grad = None
        out = model(x)
        grads = torch.autograd.grad(out, [x, *model.parameters()], torch.ones_like(out))
        outs.append((out, *grads))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if bias:  # the fused op's float64 run once (the probe and the torch backend cover both)
        return
    new[1].backend = "triton"
    out = new(x)
    grads = torch.autograd.grad(out, [x, *new.parameters()], torch.ones_like(out))
    for a, b in zip((out, *grads), outs[0]):
        assert_close_rel(a, b, torch.float64, "triton backend")


def test_swap_keeps_parameters_and_leaves_a_look_alike():
    import attnsr

    model = _restormer_like(False)
    temperature = model[1].temperature
    attnsr.swap_attention(model, backend="triton")
    assert model[1].temperature is temperature
    other = torch.nn.Sequential(NotNormalised(24, 2, False))
    attnsr.swap_attention(other, backend="torch")
    assert isinstance(other[0], NotNormalised)
    assert other.attnsr_left and "computes something else" in other.attnsr_left[0][2]


def test_layer_backends_agree():
    from attnsr.layers import TransposedAttention

    layer = TransposedAttention(12, 3, bias=True, backend="torch").to(DEVICE)
    with torch.no_grad():
        layer.temperature.uniform_(0.5, 1.5)
    x = draw(1, 12, 5, 9).float()
    expect = layer.double()(x.double())
    layer.float().backend = "triton"
    assert_close_rel(layer(x), expect, torch.float32, "layer output")
    assert "num_heads=3" in repr(layer)


@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_qkv_gets_one_gradient_buffer(channels_last):
    """transposed_attention_qkv(qkv) (Restormer's chunk(3, 1) of one conv output): the backward
    writes qkv's gradient as one buffer laid out like qkv, handed to qkv directly (no
    SplitBackward, no cat of three gradients)."""
    qkv = draw(2, 3 * 12, 5, 6).float()
    if channels_last:
        qkv = qkv.contiguous(memory_format=torch.channels_last)
    qkv.requires_grad_()
    t = _temperature(2, torch.float32)
    out = transposed_attention_qkv(qkv, t, heads=2)
    assert any(getattr(fn, "variable", None) is qkv for fn, _ in out.grad_fn.next_functions)
    g = draw(*out.shape).float()
    dqkv, dt = torch.autograd.grad(out, (qkv, t), g)
    assert dqkv.stride() == qkv.stride()
    ref_in = [qkv.detach().double().requires_grad_(), t.detach().double().requires_grad_()]
    expect = transposed_attention_ref(*ref_in[0].chunk(3, dim=1), ref_in[1], heads=2)
    want = torch.autograd.grad(expect, ref_in, g.double())
    assert_close_rel(dqkv, want[0], torch.float32, "d(qkv)")
    assert_close_rel(dt, want[1], torch.float32, "dτ")
    # a qkv that does not require grad, or one whose elements are not dense: the plain path
    with torch.no_grad():
        assert_close_rel(transposed_attention_qkv(qkv, t, heads=2), expect, torch.float32, "no grad")
    sliced = draw(2, 3 * 12 + 2, 5, 6).float()[:, 1:-1].requires_grad_()
    check_op(lambda x, t: transposed_attention_qkv(x, t, heads=2),
             lambda x, t: transposed_attention_ref(*x.chunk(3, dim=1), t, heads=2), [sliced, t], torch.float32,
             "sliced qkv")
