"""cbam_gate against the float64 eager reference (channel gate, then spatial gate): forward and the
gradients of x, w1, b1, w2, b2, sweight, sbias; pass counts and what is saved for backward."""

import importlib
import inspect

import pytest
import torch
from conftest import DEVICE
from gating_checks import LaunchLog, check_op, check_pass_counts, conv_weights, feature_map, mlp_weights

from attnsr.kernels import _gating, cbam_gate
from attnsr.kernels.reference import cbam_gate_ref

MODULES = [_gating, *(importlib.import_module(f"attnsr.kernels.{name}") for name in ("channel_gate", "spatial_gate"))]


def _fn(pool):
    return lambda x, w1, b1, w2, b2, sw, sb: cbam_gate(x, w1, b1, w2, b2, sw, sb, pool=pool)


def _ref(pool):
    return lambda x, w1, b1, w2, b2, sw, sb: cbam_gate_ref(x, w1, b1, w2, b2, sw, sb, pool=pool)


def _inputs(shape, dtype, k, *, hidden=2, channels_last=False, biases=True):
    x = feature_map(shape, dtype, channels_last=channels_last)
    return [x, *mlp_weights(shape[1], hidden, dtype, biases=biases), *conv_weights(k, dtype, bias=biases)]


# (B, C, H, W, hidden): B = 1 and 3, C not a power of two and above one 16-channel interpreter
# block, H != W, H·W = 63 and 143 (not multiples of the blocks; 143 spans three pixel chunks).
SHAPES = [(1, 5, 7, 9, 2), (3, 18, 13, 11, 3), (2, 32, 8, 8, 4)]  # and exact block multiples


@pytest.mark.parametrize("pool", ["avg", "avgmax"])
@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cbam_gate_matches_reference(shape, k, pool):
    *dims, hidden = shape
    inputs = _inputs(tuple(dims), torch.float32, k, hidden=hidden)
    check_op(_fn(pool), _ref(pool), inputs, torch.float32, f"cbam {shape} k={k} {pool}")


def test_cbam_gate_on_the_common_64x64_map():
    """64×64 pixels: every pixel block and channel chunk full (exact multiples of the blocks)."""
    inputs = _inputs((1, 16, 64, 64), torch.float32, 7, hidden=4)
    check_op(_fn("avgmax"), _ref("avgmax"), inputs, torch.float32, "cbam 1x16x64x64 k=7 avgmax")


@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_cbam_gate_float16(pool):
    inputs = _inputs((3, 18, 13, 11), torch.float16, 7, hidden=3)
    check_op(_fn(pool), _ref(pool), inputs, torch.float16, f"fp16 {pool}")


def test_cbam_gate_bfloat16():
    """bf16 loads/stores work in the interpreter (no tl.dot here); its fp32→bf16 store truncates."""
    inputs = _inputs((2, 6, 9, 10), torch.bfloat16, 7)
    check_op(_fn("avgmax"), _ref("avgmax"), inputs, torch.bfloat16, "bf16")


@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_cbam_gate_channels_last(pool):
    inputs = _inputs((3, 18, 13, 11), torch.float32, 7, hidden=3, channels_last=True)
    out, (dx, *_) = check_op(_fn(pool), _ref(pool), inputs, torch.float32, f"cl {pool}")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert dx.is_contiguous(memory_format=torch.channels_last)


def test_cbam_gate_without_biases_strided_view_expanded_grad():
    base = feature_map((2, 9, 12, 16), torch.float32).detach()
    x = base[:, 1:8, ::2, 3:14].requires_grad_()  # (2, 7, 6, 11), non-contiguous
    inputs = [x, *mlp_weights(7, 2, torch.float32, biases=False), *conv_weights(3, torch.float32, bias=False)]
    grad = torch.ones(1, 1, 1, 1, device=DEVICE).expand(2, 7, 6, 11)
    check_op(_fn("avgmax"), _ref("avgmax"), inputs, torch.float32, "view", grad=grad)


def test_cbam_gate_max_ties():
    """Ties in both max pools, both routed to the first index as in the reference: every pixel of
    a channel has the same value (channel max over pixels), and channels 1 and 3 are equal with
    equal MLP rows, so x · ca ties between them at every pixel (spatial max over channels)."""
    b, c, h, w = 2, 4, 9, 15  # 135 pixels: three interpreter chunks
    x = torch.randn(b, c, 1, 1, device=DEVICE) * 0.3
    x[:, 3] = x[:, 1] = 2.0
    x = x.expand(b, c, h, w).contiguous().requires_grad_()
    w1, b1, w2, b2 = (t.detach() for t in mlp_weights(c, 2, torch.float32))
    w2[3] = w2[1] = 0.0
    b2[3] = b2[1] = 1.0  # ca = sigmoid(2) for both: x · ca is largest in channels 1 and 3
    weights = [t.requires_grad_() for t in (w1, b1, w2, b2)]
    inputs = [x, *weights, *conv_weights(3, torch.float32)]
    check_op(_fn("avgmax"), _ref("avgmax"), inputs, torch.float32, "ties")
    second = torch.autograd.grad(_fn("avgmax")(*inputs), inputs, torch.ones(b, c, h, w, device=DEVICE))
    third = torch.autograd.grad(_fn("avgmax")(*inputs), inputs, torch.ones(b, c, h, w, device=DEVICE))
    assert all(torch.equal(u, v) for u, v in zip(second, third)), "gradients differ between two runs"


@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_cbam_gate_gradcheck(pool):
    inputs = _inputs((2, 3, 2, 3), torch.float64, 3)
    assert torch.autograd.gradcheck(_fn(pool), tuple(inputs), fast_mode=pool == "avg")  # avgmax: full


@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_cbam_gate_pass_counts(monkeypatch, pool):
    """The header's count: forward reads x three times and writes y once (x · ca is never written);
    backward reads dy three times and x twice and writes dx once; the only map-sized tensor saved
    for backward is x itself."""
    log = LaunchLog(monkeypatch, MODULES)
    x, *weights = _inputs((2, 5, 7, 9), torch.float32, 7)
    check_pass_counts(log, lambda x: _fn(pool)(x, *weights), x, forward=(3, 1), backward=(3, 2, 1))


def test_cbam_gate_bad_input():
    inputs = _inputs((2, 6, 5, 5), torch.float32, 3)
    x, w1, b1, w2, b2, sw, sb = inputs
    with pytest.raises(ValueError, match=r"cbam_gate: w1 is \(2, 4\) but x has C = 6"):
        cbam_gate(x, w1[:, :4], b1, w2, b2, sw, sb)
    with pytest.raises(ValueError, match=r"cbam_gate: sweight has kernel size k = 2; expected an odd k"):
        cbam_gate(x, w1, b1, w2, b2, torch.randn(1, 2, 2, 2), sb)
    with pytest.raises(ValueError, match=r"cbam_gate: sbias is \(1, 1\); expected \(1,\) or None"):
        cbam_gate(x, w1, b1, w2, b2, sw, torch.randn(1, 1))
    with pytest.raises(TypeError, match=r"cbam_gate: x is torch.float32 but sweight is torch.float64"):
        cbam_gate(x, w1, b1, w2, b2, sw.double(), sb)
    with pytest.raises(ValueError, match=r"cbam_gate: x is on cpu but b2 is on meta"):
        cbam_gate(*(t.cpu() for t in (x, w1, b1, w2)), b2.to("meta"), sw.cpu(), sb.cpu())
    with pytest.raises(ValueError, match=r"cbam_gate: pool='sum'"):
        cbam_gate(x, w1, b1, w2, b2, sw, sb, pool="sum")


def test_cbam_gate_empty_batch():
    inputs = _inputs((0, 4, 3, 5), torch.float32, 3)
    assert cbam_gate(*inputs, pool="avgmax").shape == (0, 4, 3, 5)


def test_cbam_gate_default_pool_is_cbams_everywhere():
    """One default, CBAM's avg + max pooling: the kernel, the backends' dispatch and the reference."""
    from attnsr import backends
    from attnsr.kernels import reference

    for fn in (cbam_gate, backends.cbam_gate, reference.cbam_gate_ref):
        default = inspect.signature(fn).parameters["pool"].default
        assert default == "avgmax", f"{fn.__module__}.{fn.__name__}: pool defaults to {default!r}"
    inputs = [t.detach() for t in _inputs((2, 6, 5, 7), torch.float32, 3)]
    assert torch.equal(cbam_gate(*inputs), cbam_gate(*inputs, pool="avgmax"))
    assert not torch.equal(cbam_gate(*inputs), cbam_gate(*inputs, pool="avg"))
