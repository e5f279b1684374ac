"""spatial_gate against the float64 reference: forward and the gradients of x, weight and bias."""

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
    conv_weights,
    feature_map,
    leaf,
)

from attnsr.kernels import _gating, spatial_gate
from attnsr.kernels.reference import spatial_gate_ref

sg_module = importlib.import_module("attnsr.kernels.spatial_gate")


def _ref(x, weight, bias):
    return spatial_gate_ref(x, weight, bias)


# (B, C, H, W): B = 1 and 3, C = 1 and not a power of two, C above one 16-channel interpreter
# block, H != W, H·W = 63 and 143 (not multiples of the 32- and 64-pixel blocks), H < k; and exact
# multiples of the blocks: 32 channels on an 8×8 map, and a 64×64 map.
SHAPES = [(1, 5, 7, 9), (3, 12, 13, 11), (2, 1, 5, 6), (1, 19, 3, 8), (2, 32, 8, 8), (1, 4, 64, 64)]


@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_spatial_gate_matches_reference(shape, dtype, k):
    x = feature_map(shape, dtype)
    check_op(spatial_gate, _ref, [x, *conv_weights(k, dtype)], dtype, f"spatial_gate {shape} k={k}")


@pytest.mark.parametrize("programs", [1, 2])
def test_convolution_backward_loops_when_programs_are_capped(programs, monkeypatch):
    """With fewer programs than pixel blocks, each program loops over several blocks (the last one
    partly past the map): the weight, bias and x gradients are unchanged, and the partials shrink."""
    monkeypatch.setattr(_gating, "CONV_PROGRAMS", 2 * programs)  # batch 2: `programs` per batch element
    sizes = []
    empty = torch.empty

    def spy(*shape, **kw):
        t = empty(*shape, **kw)
        sizes.append(tuple(t.shape))
        return t

    monkeypatch.setattr(sg_module.torch, "empty", spy)
    x = feature_map((2, 6, 13, 11), torch.float32)  # 143 pixels: 3 blocks of 64 under the interpreter
    check_op(spatial_gate, _ref, [x, *conv_weights(5, torch.float32)], torch.float32,
             f"spatial_gate, {programs} conv program(s) per batch element")
    partials = [s for s in sizes if len(s) == 4 and s[2] == 2]  # (B, programs, 2, KK)
    assert partials and all(s[1] <= programs for s in partials), partials


@pytest.mark.parametrize("k", [9, 11, 13, 15])
def test_spatial_gate_large_kernels(k):
    """k from 9 to the limit 15: k² taps of 81 to 225 (padded to 128 and 256), the kernel wider
    than the map in one direction."""
    x = feature_map((2, 5, 12, 9), torch.float32)
    check_op(spatial_gate, _ref, [x, *conv_weights(k, torch.float32)], torch.float32, f"spatial_gate k={k}")


@pytest.mark.parametrize("k", [1, 5])
def test_spatial_gate_other_kernel_sizes_without_bias(k):
    x = feature_map((2, 6, 8, 7), torch.float32)
    check_op(spatial_gate, _ref, [x, *conv_weights(k, torch.float32, bias=False)], torch.float32, f"k={k}")


@pytest.mark.parametrize("k", [3, 7])
def test_spatial_gate_channels_last(k):
    x = feature_map((3, 12, 13, 11), torch.float32, channels_last=True)
    out, (dx, *_) = check_op(spatial_gate, _ref, [x, *conv_weights(k, torch.float32)], torch.float32, "cl")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert dx.is_contiguous(memory_format=torch.channels_last)


def test_spatial_gate_bfloat16():
    """bf16 loads/stores work in the interpreter (no tl.dot here); its fp32→bf16 store truncates."""
    x = feature_map((2, 6, 9, 10), torch.bfloat16)
    check_op(spatial_gate, _ref, [x, *conv_weights(7, torch.bfloat16)], torch.bfloat16, "bf16")


def test_spatial_gate_strided_view_and_expanded_grad():
    """x is a non-contiguous slice (read in place) and the upstream gradient has stride 0."""
    base = feature_map((2, 9, 12, 16), torch.float32).detach()
    x = base[:, 1:8, ::2, 3:14].requires_grad_()  # (2, 7, 6, 11)
    grad = torch.ones(1, 1, 1, 1, device=DEVICE).expand(2, 7, 6, 11)
    check_op(spatial_gate, _ref, [x, *conv_weights(3, torch.float32)], torch.float32, "view", grad=grad)


def test_spatial_gate_max_tie_goes_to_first_channel():
    """Channels 2, 9 and 18 tie for the max at every pixel (across 16-channel blocks): only
    channel 2 gets the max gradient."""
    b, c, h, w = 2, 19, 5, 7
    x = torch.randn(b, c, h, w, device=DEVICE) - 5.0
    x[:, [2, 9, 18]] = torch.rand(b, 1, h, w, device=DEVICE) + 1.0
    x.requires_grad_()
    dy = torch.randn(b, 1, h, w, device=DEVICE).expand(b, c, h, w)  # the same dy in every channel
    _, (dx, *_) = check_op(spatial_gate, _ref, [x, *conv_weights(3, torch.float32)], torch.float32, "tie", grad=dy)
    # dx = dy·s + d_mean/C (+ d_max at the arg-max channel): the tied channels see the same dy and
    # x, so they differ only by the routed d_max
    assert torch.equal(dx[:, 9], dx[:, 18])
    assert (dx[:, 2] != dx[:, 9]).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN inputs, on purpose
def test_spatial_gate_max_pool_with_nan_and_inf_matches_torch():
    """NaN counts as greater than every number (torch.max / torch.argmax): the first NaN channel of a
    pixel is its max and arg-max, also in a later 16-channel block behind larger numbers; ±inf are
    ordinary values; a pixel of -inf keeps channel 0. Output and gradients carry NaN and inf where
    the reference's do."""
    nan, inf = float("nan"), float("inf")
    x = feature_map((2, 20, 6, 7), torch.float32).detach()
    x[0, 18, 1, 1] = nan
    x[0, 3, 1, 1] = nan  # the first NaN of pixel (1, 1)
    x[0, 17, 2, 2] = nan  # behind the first block's larger numbers
    x[0, 0, 2, 2] = 50.0
    x[0, 5, 3, 3] = inf
    x[0, 12, 3, 3] = inf
    x[0, :, 5, 6] = -inf
    x[1, 19, 0, 0] = nan
    weight, bias = (t.detach() for t in conv_weights(3, torch.float32))
    _, stats, sarg, _ = sg_module._spatial_gate_op(x, weight, bias)
    assert_max_matches_torch(stats[:, 1], sarg, x.flatten(2), 1, "spatial max pool")
    x.requires_grad_()
    out = spatial_gate(x, weight, bias)
    xd = x.detach().double().requires_grad_()
    expect = spatial_gate_ref(xd, weight.double(), bias.double())
    assert_same_nonfinite(out, expect, torch.float32, "output")
    dy = torch.randn_like(out)
    (dx,), (want,) = torch.autograd.grad(out, x, dy), torch.autograd.grad(expect, xd, dy.double())
    assert_same_nonfinite(dx, want, torch.float32, "d(x)")


def test_spatial_gate_deterministic():
    x = feature_map((2, 6, 9, 13), torch.float32)
    weight, bias = conv_weights(7, torch.float32)
    dy = torch.randn(2, 6, 9, 13, device=DEVICE)
    first = torch.autograd.grad(spatial_gate(x, weight, bias), (x, weight, bias), dy)
    second = torch.autograd.grad(spatial_gate(x, weight, bias), (x, weight, bias), dy)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("k,fast", [(3, False), (5, True)])
def test_spatial_gate_gradcheck(k, fast):
    x = feature_map((2, 3, 3, 4), torch.float64)
    assert torch.autograd.gradcheck(spatial_gate, (x, *conv_weights(k, torch.float64)), fast_mode=fast)


def test_spatial_gate_pass_counts(monkeypatch):
    """The header's count: forward reads x twice and writes y once; backward reads dy twice and x
    once and writes dx once; the only map-sized tensor saved for backward is x itself."""
    log = LaunchLog(monkeypatch, [_gating, sg_module])
    weights = conv_weights(7, torch.float32)
    check_pass_counts(log, lambda x: spatial_gate(x, *weights), feature_map((2, 5, 7, 9), torch.float32),
                      forward=(2, 1), backward=(2, 1, 1))


def test_spatial_gate_bad_input():
    x = feature_map((2, 6, 5, 5), torch.float32)
    weight, bias = conv_weights(3, torch.float32)
    with pytest.raises(ValueError, match=r"weight has kernel size k = 4; expected an odd k"):
        spatial_gate(x, torch.randn(1, 2, 4, 4), bias)
    with pytest.raises(ValueError, match=r"weight has kernel size k = 17; expected an odd k from 1 to 15"):
        spatial_gate(x, torch.randn(1, 2, 17, 17), bias)
    with pytest.raises(ValueError, match=r"weight is \(1, 3, 3, 3\); expected \(1, 2, k, k\)"):
        spatial_gate(x, torch.randn(1, 3, 3, 3), bias)
    with pytest.raises(ValueError, match=r"weight is \(1, 2, 3, 5\); expected \(1, 2, k, k\)"):
        spatial_gate(x, torch.randn(1, 2, 3, 5), bias)
    with pytest.raises(ValueError, match=r"weight has 3 dims"):
        spatial_gate(x, torch.randn(2, 3, 3), bias)
    with pytest.raises(ValueError, match=r"bias is \(2,\); expected \(1,\) or None"):
        spatial_gate(x, weight, torch.randn(2))
    with pytest.raises(TypeError, match=r"x is torch.float32 but weight is torch.float16"):
        spatial_gate(x, weight.half(), bias)
    with pytest.raises(ValueError, match=r"x is on cpu but bias is on meta"):
        spatial_gate(x.cpu(), weight.cpu(), bias.to("meta"))
    with pytest.raises(TypeError, match=r"weight must be a torch.Tensor, got list"):
        spatial_gate(x, [[1.0]], bias)


def test_spatial_gate_empty_batch():
    y = spatial_gate(leaf((0, 4, 3, 5), torch.float32), *conv_weights(3, torch.float32))
    assert y.shape == (0, 4, 3, 5)
