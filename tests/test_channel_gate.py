"""channel_gate against the float64 reference: forward and the gradients of x, w1, b1, w2, b2."""

import importlib

import pytest
import torch
from conftest import DEVICE
from gating_checks import (
    LaunchLog,
    assert_max_matches_torch,
    assert_same_nonfinite,
    check_op,
    check_pass_counts,
    draw,
    feature_map,
    leaf,
    mlp_weights,
)

from attnsr.kernels import _gating, channel_gate
from attnsr.kernels.reference import channel_gate_ref

# the module (attnsr.kernels.channel_gate is the function: the package exports it under the module's name)
cg_module = importlib.import_module("attnsr.kernels.channel_gate")


def _fn(pool, act="relu"):
    return lambda x, w1, b1, w2, b2: channel_gate(x, w1, b1, w2, b2, pool=pool, act=act)


def _ref(pool, act="relu"):
    return lambda x, w1, b1, w2, b2: channel_gate_ref(x, w1, b1, w2, b2, pool=pool, act=act)


# (B, C, H, W, hidden): B = 1 and 3, C not a power of two, H != W, H·W = 63 (under one 64-pixel
# interpreter chunk) and 143 (three chunks, the last one partial), hidden = 1; and exact multiples
# of the blocks: 16 channels and 8×16 pixels (two full interpreter chunks), and a 64×64 map.
SHAPES = [(1, 5, 7, 9, 2), (3, 12, 13, 11, 3), (2, 3, 1, 20, 1), (2, 16, 8, 16, 4), (1, 16, 64, 64, 4)]


@pytest.mark.parametrize("pool", ["avg", "avgmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_channel_gate_matches_reference(shape, dtype, pool):
    b, c, h, w, hidden = shape
    x = feature_map((b, c, h, w), dtype)
    check_op(_fn(pool), _ref(pool), [x, *mlp_weights(c, hidden, dtype)], dtype, f"channel_gate {shape} {pool}")


@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_channel_gate_channels_last(pool):
    x = feature_map((3, 12, 13, 11), torch.float32, channels_last=True)
    out, (dx, *_) = check_op(_fn(pool), _ref(pool), [x, *mlp_weights(12, 3, torch.float32)], torch.float32, "cl")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert dx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_channel_gate_bfloat16(pool):
    """bf16 loads/stores work in the interpreter (no tl.dot here); its fp32→bf16 store truncates."""
    x = feature_map((2, 6, 9, 10), torch.bfloat16)
    check_op(_fn(pool), _ref(pool), [x, *mlp_weights(6, 2, torch.bfloat16)], torch.bfloat16, f"bf16 {pool}")


@pytest.mark.parametrize(("act", "pool", "shape"), [("gelu", "avg", (3, 12, 13, 11, 3)),
                                                    ("silu", "avgmax", (1, 5, 7, 9, 2))])
def test_channel_gate_activations(act, pool, shape):
    """SE gates with GELU (erf) or SiLU between the layers (OmniSR, MixDehazeNet, EfficientNet):
    forward and every gradient against float64, the pre-activations of both signs."""
    b, c, h, w, hidden = shape
    x = feature_map((b, c, h, w), torch.float32)
    check_op(_fn(pool, act), _ref(pool, act), [x, *mlp_weights(c, hidden, torch.float32)], torch.float32,
             f"channel_gate {shape} {pool} act={act}")


@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_channel_gate_activations_float64(act):
    """The activations' derivatives in float64, to float64's tolerance (the kernels' erf, exp and
    sigmoid forms against torch's)."""
    x = feature_map((2, 5, 4, 3), torch.float64)
    check_op(_fn("avgmax", act), _ref("avgmax", act), [x, *mlp_weights(5, 3, torch.float64)], torch.float64,
             f"channel_gate float64 act={act}")


def test_channel_gate_without_biases():
    x = feature_map((2, 7, 6, 5), torch.float32)
    check_op(_fn("avgmax"), _ref("avgmax"), [x, *mlp_weights(7, 2, torch.float32, biases=False)], torch.float32, "nob")


def test_channel_gate_strided_view_and_expanded_grad():
    """x is a non-contiguous slice (read in place) and the upstream gradient has stride 0."""
    base = feature_map((2, 9, 12, 16), torch.float32).detach()
    x = base[:, 1:8, ::2, 3:14].requires_grad_()  # (2, 7, 6, 11), no unit stride on W
    assert not x.is_contiguous()
    grad = torch.ones(1, 1, 1, 1, device=DEVICE).expand(2, 7, 6, 11)
    check_op(_fn("avgmax"), _ref("avgmax"), [x, *mlp_weights(7, 2, torch.float32)], torch.float32, "view", grad=grad)


def test_channel_gate_max_tie_goes_to_first_pixel():
    """Every pixel of a channel ties for the max: its gradient reaches pixel (0, 0) only."""
    b, c, h, w = 2, 3, 9, 15  # 135 pixels: three interpreter chunks, all tied
    x = (draw(b, c, 1, 1).float().expand(b, c, h, w).contiguous()).requires_grad_()
    weights = mlp_weights(c, 2, torch.float32)
    dy = torch.ones(b, c, h, w, device=DEVICE)
    _, (dx, *_) = check_op(_fn("avgmax"), _ref("avgmax"), [x, *weights], torch.float32, "tie", grad=dy)
    flat = dx.detach().flatten(2)
    # with dy = 1 and x constant per channel, every pixel but the arg-max gets the same gradient
    assert torch.equal(flat[:, :, 1:], flat[:, :, 1:2].expand_as(flat[:, :, 1:]))
    assert (flat[:, :, 0] != flat[:, :, 1]).all()
    # deterministic: a second run is bitwise equal
    dx2 = torch.autograd.grad(channel_gate(x, *weights, pool="avgmax"), x, dy)[0]
    assert torch.equal(dx, dx2)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN inputs, on purpose
def test_channel_gate_max_pool_with_nan_and_inf_matches_torch():
    """NaN counts as greater than every number (torch.max / torch.argmax): the first NaN of a channel
    is its max and arg-max, even when a larger number or another NaN sits in an earlier chunk; ±inf
    are ordinary values (the first +inf wins); a channel of -inf keeps pixel 0. Output and input
    gradient then carry NaN and inf exactly where the reference's do."""
    nan, inf = float("nan"), float("inf")
    x = feature_map((3, 5, 9, 16), torch.float32).detach()  # 144 pixels: three 64-pixel interpreter chunks
    x[0, 1, 8, 3] = nan  # pixel 131, third chunk
    x[0, 1, 6, 0] = nan  # pixel 96, second chunk: the first NaN
    x[0, 1, 0, 0] = 50.0  # a large number before both
    x[0, 2, 0, 1] = inf
    x[0, 2, 8, 15] = inf
    x[0, 3] = -inf
    x[1, 4, 7, 4] = nan  # pixel 116 only
    weights = [t.detach() for t in mlp_weights(5, 2, torch.float32)]
    _, _, _, mx, arg = cg_module._channel_gate_op(x, *weights, "avgmax", "relu")
    assert_max_matches_torch(mx, arg, x.flatten(2), 2, "channel max pool")
    x.requires_grad_()
    out = channel_gate(x, *weights, pool="avgmax")
    xd = x.detach().double().requires_grad_()
    expect = channel_gate_ref(xd, *(w.double() for w in weights), pool="avgmax")
    assert_same_nonfinite(out, expect, torch.float32, "output")
    dy = torch.randn_like(out)
    (dx,), (want,) = torch.autograd.grad(out, x, dy), torch.autograd.grad(expect, xd, dy.double())
    assert_same_nonfinite(dx, want, torch.float32, "d(x)")


@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_channel_gate_gradcheck(pool):
    x = feature_map((2, 3, 3, 2), torch.float64)
    weights = mlp_weights(3, 2, torch.float64)
    assert torch.autograd.gradcheck(_fn(pool), (x, *weights))


@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_channel_gate_pass_counts(monkeypatch, pool):
    """The header's count: forward reads x twice and writes y once; backward reads dy twice and x
    once and writes dx once; the only map-sized tensor saved for backward is x itself."""
    log = LaunchLog(monkeypatch, [_gating, cg_module])
    weights = mlp_weights(5, 2, torch.float32)
    check_pass_counts(log, lambda x: channel_gate(x, *weights, pool=pool), feature_map((2, 5, 7, 9), torch.float32),
                      forward=(2, 1), backward=(2, 1, 1))


def test_channel_gate_bad_input():
    x = feature_map((2, 6, 5, 5), torch.float32)
    w1, b1, w2, b2 = mlp_weights(6, 2, torch.float32)
    with pytest.raises(ValueError, match=r"w1 is \(2, 5\) but x has C = 6"):
        channel_gate(x, w1[:, :5], b1, w2, b2)
    with pytest.raises(ValueError, match=r"w2 is \(6, 3\); expected \(C, C//r\) = \(6, 2\)"):
        channel_gate(x, w1, b1, torch.randn(6, 3), b2)
    with pytest.raises(ValueError, match=r"b1 is \(3,\); expected \(2,\) or None"):
        channel_gate(x, w1, torch.randn(3), w2, b2)
    with pytest.raises(ValueError, match=r"b2 is \(5,\); expected \(6,\) or None"):
        channel_gate(x, w1, b1, w2, torch.randn(5))
    with pytest.raises(TypeError, match=r"x is torch.float32 but w1 is torch.float64"):
        channel_gate(x, w1.double(), b1, w2, b2)
    with pytest.raises(ValueError, match=r"x is on cpu but w2 is on meta"):
        channel_gate(x.cpu(), w1.cpu(), b1.cpu(), w2.to("meta"), b2.cpu())
    with pytest.raises(ValueError, match=r"pool='max'; expected one of 'avg', 'avgmax'"):
        channel_gate(x, w1, b1, w2, b2, pool="max")
    with pytest.raises(ValueError, match=r"act='tanh'; expected one of 'relu', 'gelu', 'silu'"):
        channel_gate(x, w1, b1, w2, b2, act="tanh")
    with pytest.raises(ValueError, match=r"x has 3 dims"):
        channel_gate(x[0], w1, b1, w2, b2)
    with pytest.raises(TypeError, match=r"x has dtype torch.int64"):
        channel_gate(x.long(), w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"expected C, H and W of at least 1"):
        channel_gate(x[:, :, :0], w1, b1, w2, b2)
    huge = torch.zeros((), device=x.device).expand(1, 6, 46341, 46341)  # > 2^31 pixels, nothing allocated
    with pytest.raises(ValueError, match=r"x has H·W = 2147488281 pixels; at most 2147418112 are supported"):
        channel_gate(huge, w1, b1, w2, b2)


def test_channel_gate_empty_batch():
    x = leaf((0, 4, 3, 5), torch.float32)
    y = channel_gate(x, *mlp_weights(4, 2, torch.float32), pool="avgmax")
    assert y.shape == (0, 4, 3, 5)
