"""window_attention (Swin W-MSA / SW-MSA) against the float64 reference written from SwinIR's maths:
output and every gradient (q, k, v, the bias table), shifts, rectangular and odd windows, head dims
that are not powers of two, the layouts SR transformers hold q, k, v in, masks, determinism, errors."""

import importlib

import pytest
import torch
import triton
from conftest import DEVICE, needs_gpu
from tolerances import FP32_PRECISION_TOL, assert_close_rel

from attnsr.kernels import window_attention
from attnsr.kernels._runtime import dot_precision
from attnsr.kernels.reference import relative_position_index, swin_shift_mask, window_attention_ref


def _qkv(layout, b, h, w, c, dtype):
    """q, k, v as (B, H, W, C) views of one tensor laid out as ``layout``, and the leaf tensor."""
    base = torch.randn(b, h * w, 3 * c, device=DEVICE, dtype=torch.float64).to(dtype)
    if layout == "swinir":  # the (B, H·W, 3C) output of one qkv Linear, channels [3][heads][d]
        leaf = base.requires_grad_()
        return (*leaf.view(b, h, w, 3 * c).split(c, -1), leaf)
    if layout == "nchw":  # a fused qkv conv output (B, 3C, H, W), seen through a permuted view
        leaf = base.view(b, h, w, 3 * c).permute(0, 3, 1, 2).contiguous().requires_grad_()
        return (*leaf.permute(0, 2, 3, 1).split(c, -1), leaf)
    leaf = base.view(b, h, w, 3 * c).requires_grad_()  # "nhwc"
    return (*leaf.split(c, -1), leaf)


def _table(window, heads, dtype):
    wh, ww = window
    return (torch.randn((2 * wh - 1) * (2 * ww - 1), heads, device=DEVICE, dtype=torch.float64) * 0.5).to(dtype) \
        .requires_grad_()


def _check_grads(out, ref, leaf, table, dtype, tol=None):
    """The gradients of the fused output ``out`` and of its float64 reference ``ref`` for one random
    upstream gradient, with respect to the qkv leaf and the bias table, within the dtype's bound."""
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (leaf, table), grad)
    want = torch.autograd.grad(ref, (leaf, table), grad.double())
    assert_close_rel(got[0], want[0], dtype, "dqkv", tol=tol)
    assert_close_rel(got[1], want[1], dtype, "d bias_table", tol=tol)
    return got


CASES = [  # b, h, w, c, heads, window, shift, bias, layout
    pytest.param(1, 16, 16, 20, 2, (8, 8), (4, 4), True, "swinir", id="swinir-w8-shift4-D10"),
    pytest.param(2, 8, 12, 20, 2, (4, 6), (2, 3), True, "nhwc", id="rect-w4x6-shift2x3-B2"),
    pytest.param(1, 8, 8, 60, 2, (4, 4), (0, 0), False, "nchw", id="nchw-w4-noshift-D30"),
    pytest.param(1, 16, 8, 60, 2, (8, 8), (4, 4), True, "swinir", id="hat-D30-w8-shift4"),  # SwinIR/HAT 180/6
    pytest.param(1, 6, 10, 21, 3, (3, 5), (1, 2), True, "nhwc", id="odd-w3x5-D7"),
    pytest.param(1, 4, 8, 8, 1, (4, 8), (2, 5), True, "swinir", id="one-window-shifted"),
    pytest.param(1, 16, 16, 20, 2, (16, 16), (8, 8), True, "swinir", id="w16-N256-shift8"),  # HAT's window
    pytest.param(1, 8, 8, 64, 2, (4, 4), (2, 2), True, "nhwc", id="D32"),
    pytest.param(1, 8, 8, 64, 1, (4, 4), (2, 2), True, "swinir", id="D64"),
]


@pytest.mark.parametrize("b,h,w,c,heads,window,shift,bias,layout", CASES)
def test_matches_reference_output_and_every_gradient(b, h, w, c, heads, window, shift, bias, layout):
    dtype = torch.float32
    q, k, v, leaf = _qkv(layout, b, h, w, c, dtype)
    table = _table(window, heads, dtype) if bias else None
    kwargs = dict(window_size=window, shift_size=shift, heads=heads, bias_table=table)
    out = window_attention(q, k, v, **kwargs)
    ref = window_attention_ref(q, k, v, **kwargs, upcast=True)
    assert out.shape == (b, h, w, c) and out.dtype == dtype and out.is_contiguous()
    assert_close_rel(out, ref, dtype, "output")
    grad = torch.randn_like(out)
    inputs = (leaf, table) if bias else (leaf,)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad.double())
    assert_close_rel(got[0], want[0], dtype, "dq, dk, dv (the qkv tensor)")
    if bias:
        assert got[1].dtype == dtype and got[1].shape == table.shape
        assert_close_rel(got[1], want[1], dtype, "d bias_table")


def test_gradcheck_float64():
    """Directional derivatives (gradcheck's fast mode: each interpreted launch costs a second)."""
    *_, leaf = _qkv("nhwc", 1, 4, 6, 4, torch.float64)
    table = _table((2, 3), 2, torch.float64)

    def fn(leaf, table):
        return window_attention(*leaf.split(4, -1), window_size=(2, 3), shift_size=1, heads=2, bias_table=table)

    assert torch.autograd.gradcheck(fn, (leaf, table), eps=1e-6, atol=1e-8, fast_mode=True)


def test_float64_matches_the_reference_to_float64_precision():
    q, k, v, _ = _qkv("swinir", 2, 8, 8, 12, torch.float64)
    table = _table((4, 4), 3, torch.float64)
    kwargs = dict(window_size=4, shift_size=2, heads=3, bias_table=table)
    assert_close_rel(window_attention(q, k, v, **kwargs), window_attention_ref(q, k, v, **kwargs), torch.float64)


def test_in_kernel_mask_equals_swins_mask_bit_for_bit():
    """Swin's −100 mask computed from coordinates gives the very bits of the same mask passed in."""
    q, k, v, leaf = _qkv("nhwc", 1, 8, 12, 8, torch.float64)
    table = _table((4, 4), 2, torch.float64)
    mask = swin_shift_mask(8, 12, 4, 2, dtype=torch.float64, device=DEVICE)
    assert mask.shape == (6, 16, 16) and set(mask.unique().tolist()) == {-100.0, 0.0}
    kwargs = dict(window_size=4, shift_size=2, heads=2, bias_table=table)
    out = window_attention(q, k, v, **kwargs)
    given = window_attention(q, k, v, **kwargs, mask=mask)
    assert torch.equal(out, given)
    grad = torch.randn_like(out)  # and the backward: the same bits for q, k, v and the table
    for got, want in zip(torch.autograd.grad(out, (leaf, table), grad, retain_graph=True),
                         torch.autograd.grad(given, (leaf, table), grad, retain_graph=True)):
        assert torch.equal(got, want)
    # and the mask matters: without it (an explicit zero mask) the result differs
    assert not torch.allclose(window_attention(q, k, v, **kwargs), window_attention(q, k, v, **kwargs,
                                                                                       mask=torch.zeros_like(mask)))


def test_explicit_mask_is_broadcast_over_the_batch_and_gets_no_gradient():
    dtype = torch.float32
    q, k, v, leaf = _qkv("nhwc", 2, 8, 8, 8, dtype)
    mask = torch.randn(4, 16, 16, device=DEVICE).requires_grad_()
    out = window_attention(q, k, v, window_size=4, shift_size=2, mask=mask)
    ref = window_attention_ref(q, k, v, window_size=4, shift_size=2, mask=mask, upcast=True)
    assert_close_rel(out, ref, dtype, "output")
    grad = torch.randn_like(out)
    assert_close_rel(torch.autograd.grad(out, leaf, grad, retain_graph=True)[0],
                     torch.autograd.grad(ref, leaf, grad.double())[0], dtype, "dqkv")
    out.sum().backward()
    assert mask.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_a_minus_inf_mask_that_hides_a_whole_key_block_from_a_row(dtype):
    """SCUNet's shifted-window mask is −inf, not −100: in the windows of the last row and column,
    the first 32-key block of an 8×8 window holds no key of some query rows' region. The running
    max of those rows is still −inf after that block; the output and gradients must stay finite."""
    q, k, v, leaf = _qkv("swinir", 1, 16, 16, 16, dtype)
    table = _table((8, 8), 2, dtype)
    regions = swin_shift_mask(16, 16, 8, 4, device=DEVICE)
    mask = torch.where(regions != 0, float("-inf"), 0.0).to(dtype)
    out = window_attention(q, k, v, window_size=8, shift_size=4, heads=2, bias_table=table, mask=mask)
    ref = window_attention_ref(q, k, v, window_size=8, shift_size=4, heads=2, bias_table=table, mask=mask,
                               upcast=True)
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} non-finite outputs"
    assert_close_rel(out, ref, dtype, "output")
    _check_grads(out, ref, leaf, table, dtype)


def test_partitioned_windows_cycle_through_the_mask_as_swinir_broadcasts_it():
    """SwinIR's WindowAttention gets the windows already cut, (B·nW, N, C), and a (nW, N, N) mask
    that window i takes slice i mod nW of: a batch of one-window maps does the same in the kernel."""
    dtype = torch.float32
    b, nw, wh, ww, c, heads = 2, 3, 4, 4, 8, 2
    q, k, v, leaf = _qkv("swinir", b * nw, wh, ww, c, dtype)
    table = _table((wh, ww), heads, dtype)
    mask = torch.randn(nw, wh * ww, wh * ww, device=DEVICE) * 3
    kwargs = dict(window_size=(wh, ww), heads=heads, bias_table=table, mask=mask)
    out = window_attention(q, k, v, **kwargs)
    # SwinIR's formula, written out on the (B·nW, heads, N, d) windows
    n, d = wh * ww, c // heads
    qw, kw, vw = (t.double().reshape(b * nw, n, heads, d).transpose(1, 2) for t in (q, k, v))
    bias = table.double()[relative_position_index((wh, ww)).reshape(-1).to(DEVICE)].reshape(n, n, heads)
    attn = (qw * d ** -0.5) @ kw.transpose(-2, -1) + bias.permute(2, 0, 1)[None]
    attn = (attn.view(b, nw, heads, n, n) + mask.double()[None, :, None]).view(b * nw, heads, n, n)
    ref = (attn.softmax(-1) @ vw).transpose(1, 2).reshape(b * nw, wh, ww, c)
    assert_close_rel(out, ref, dtype, "output")
    assert_close_rel(out, window_attention_ref(q, k, v, **kwargs, upcast=True), dtype, "output vs reference")
    _check_grads(out, ref, leaf, table, dtype)


def test_mask_false_is_no_mask_even_when_shifted_and_one_slice_is_broadcast():
    """mask=False: a shifted call with no mask at all (HAT's block given attn_mask=None); an
    (1, N, N) mask: the same slice for every window."""
    q, k, v, _ = _qkv("nhwc", 2, 8, 12, 8, torch.float64)
    kwargs = dict(window_size=4, shift_size=2, heads=2, bias_table=_table((4, 4), 2, torch.float64))
    none = window_attention(q, k, v, **kwargs, mask=False)
    assert torch.equal(none, window_attention(q, k, v, **kwargs, mask=torch.zeros(6, 16, 16, dtype=torch.float64,
                                                                                         device=DEVICE)))
    assert_close_rel(none, window_attention_ref(q, k, v, **kwargs, mask=False), torch.float64)
    one = torch.randn(1, 16, 16, dtype=torch.float64, device=DEVICE)
    assert torch.equal(window_attention(q, k, v, **kwargs, mask=one),
                       window_attention(q, k, v, **kwargs, mask=one.expand(6, 16, 16)))


def test_a_batch_beyond_the_grid_runs_in_slices_that_keep_the_mask_phase(monkeypatch):
    """More windows than a launch takes (65535 on the batch axis; 4 here): slices of whole mask
    periods (4, 4, 2 windows for a mask of 2 slices), the result equal to the reference."""
    module = importlib.import_module("attnsr.kernels.window_attention")
    monkeypatch.setattr(module, "MAX_GRID_YZ", 4)
    q, k, v, leaf = _qkv("swinir", 10, 4, 4, 8, torch.float64)
    mask = torch.randn(2, 16, 16, dtype=torch.float64, device=DEVICE) * 3
    table = _table((4, 4), 2, torch.float64)
    kwargs = dict(window_size=4, heads=2, bias_table=table, mask=mask)
    out = window_attention(q, k, v, **kwargs)
    ref = window_attention_ref(q, k, v, **kwargs)
    assert_close_rel(out, ref, torch.float64)
    _check_grads(out, ref, leaf, table, torch.float64)
    five = torch.zeros(5, 16, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="repeats only every 5 maps, more than the kernels' 4 per launch"):
        window_attention(q, k, v, window_size=4, heads=2, mask=five)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mask", ["swin", "given"])
def test_chunked_backward_matches_reference(mask, dtype, monkeypatch):
    """The backward launches of the fp32 head-dim-64 entries: S and dP summed over 16-wide chunks of
    the head dim (BLOCK_DC), forced here in every backward kernel. Head dim 40: the chunk past it is
    partly masked, the last one wholly; a shifted window of 8 with the bias table, Swin's mask in
    the kernel or one given."""
    module = importlib.import_module("attnsr.kernels.window_attention")
    plain, chunked = module._config, []

    def with_chunks(kernel, head_dim, dt, *shape):
        blocks, launch = plain(kernel, head_dim, dt, *shape)
        if kernel in ("dkdv", "dq"):
            blocks = dict(blocks, BLOCK_DC=16)
            chunked.append(kernel)
        return blocks, launch

    monkeypatch.setattr(module, "_config", with_chunks)
    q, k, v, leaf = _qkv("swinir", 1, 16, 8, 80, dtype)
    table = _table((8, 8), 2, dtype)
    kwargs = dict(window_size=8, shift_size=4, heads=2, bias_table=table)
    if mask == "given":
        kwargs = dict(kwargs, shift_size=0, mask=torch.randn(2, 64, 64, dtype=dtype, device=DEVICE))
    out = window_attention(q, k, v, **kwargs)
    ref = window_attention_ref(q, k, v, **kwargs, upcast=True)
    assert_close_rel(out, ref, dtype, "output")
    _check_grads(out, ref, leaf, table, dtype)
    assert sorted(chunked) == ["dkdv", "dq"]
    for kernel in ("dkdv", "dq"):
        assert module._WIN_LAUNCH[(kernel, "d64", "fp32")][4] == 16  # the table's fp32 head-dim-64 entries chunk


def test_empty_maps_with_a_mask_give_empty_results():
    q = torch.randn(2, 0, 8, 8, device=DEVICE)
    assert window_attention(q, q, q, window_size=4, heads=2, mask=torch.zeros(2, 16, 16, device=DEVICE)).shape == \
        (2, 0, 8, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(dtype):
    """fp16, and bf16, what Swin-style SR models train in (they overflow fp16). On a GPU the dot
    products run on 16-bit operands; under the interpreter, whose bf16 dot is wrong, bf16 operands
    are widened to fp32 while loads, stores and probabilities stay bf16. The bias table stays fp32,
    as a model's parameter does under autocast, and so does its gradient."""
    q, k, v, leaf = _qkv("swinir", 1, 8, 8, 16, dtype)
    table = _table((4, 4), 2, torch.float32)
    kwargs = dict(window_size=4, shift_size=2, heads=2, bias_table=table)
    out = window_attention(q, k, v, **kwargs)
    ref = window_attention_ref(q, k, v, **kwargs, upcast=True)
    assert out.dtype == dtype
    assert_close_rel(out, ref, dtype, "output")
    got = _check_grads(out, ref, leaf, table, dtype)
    assert got[1].dtype == torch.float32


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_hat_shapes_on_the_gpu(dtype):
    """HAT's attention as it trains (window 16 shifted by 8, 6 heads of 30, a (B, H·W, 3C)
    projection) with the native 16-bit dots and, for fp32, the precision PyTorch's settings give
    (3×TF32 by default): output and every gradient against float64."""
    q, k, v, leaf = _qkv("swinir", 2, 32, 48, 180, dtype)
    table = _table((16, 16), 6, torch.float32)
    kwargs = dict(window_size=16, shift_size=8, heads=6, bias_table=table)
    out = window_attention(q, k, v, **kwargs)
    ref = window_attention_ref(q, k, v, **kwargs, upcast=True)
    tol = FP32_PRECISION_TOL[dot_precision(dtype)] if dtype == torch.float32 else None
    assert_close_rel(out, ref, dtype, "output", tol=tol)
    _check_grads(out, ref, leaf, table, dtype, tol)


@pytest.fixture
def deterministic():
    """``torch.use_deterministic_algorithms(True)`` for the test (warn-only: the reference's ops)."""
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(was, warn_only=warn)


DETERMINISTIC_CASES = [  # window, shift, mask slices (0: Swin's, in the kernel)
    pytest.param((4, 4), (2, 2), 0, id="w4-dq-in-dkdv"),  # one key block covers the window
    pytest.param((8, 8), (4, 4), 0, id="w8-dq-launch"),  # two key blocks under the interpreter
    pytest.param((4, 4), (0, 0), 2, id="w4-given-mask"),
]


@pytest.mark.parametrize("window,shift,slices", DETERMINISTIC_CASES)
def test_deterministic_mode_matches_reference_and_repeats_bit_for_bit(window, shift, slices, deterministic):
    """Under ``torch.use_deterministic_algorithms``: the bias table's gradient is summed in a fixed
    order (splits of the batch's windows, each program owning its rows of a partial), so two runs
    give bitwise-equal gradients, every one of them within the fp32 bound of the reference."""
    q, k, v, leaf = _qkv("nhwc", 2, 8, 16, 16, torch.float32)
    table = _table(window, 2, torch.float32)
    kwargs = dict(window_size=window, shift_size=shift, heads=2, bias_table=table)
    if slices:
        n = window[0] * window[1]
        kwargs["mask"] = torch.randn(slices, n, n, device=DEVICE)
    out = window_attention(q, k, v, **kwargs)
    ref = window_attention_ref(q, k, v, **kwargs, upcast=True)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, (leaf, table), grad, retain_graph=True)
    second = torch.autograd.grad(out, (leaf, table), grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    want = torch.autograd.grad(ref, (leaf, table), grad.double())
    assert_close_rel(first[0], want[0], torch.float32, "dqkv")
    assert_close_rel(first[1], want[1], torch.float32, "d bias_table")


def test_dq_dk_dv_are_deterministic_in_the_fast_mode():
    """Without deterministic algorithms only the table's gradient uses atomics: dq, dk and dv are
    still written once each, in a fixed order."""
    q, k, v, leaf = _qkv("nhwc", 2, 8, 8, 8, torch.float32)
    table = _table((4, 4), 2, torch.float32)
    out = window_attention(q, k, v, window_size=4, shift_size=2, heads=2, bias_table=table)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, leaf, grad, retain_graph=True)[0]
    assert torch.equal(first, torch.autograd.grad(out, leaf, grad)[0])


@pytest.mark.parametrize("window,bias,mode", [(4, True, "fast"), (4, True, "deterministic"), (4, False, "fast"),
                                              (8, True, "fast"), (8, True, "deterministic"), (8, False, "fast")])
def test_launches_per_forward_and_backward(window, bias, mode, monkeypatch, request):
    """Triton launches of one forward+backward call: the forward; one dK/dV launch that also forms
    Δ, dS's sums for the table and, where one key block covers the window, dQ; a dQ launch
    otherwise; the table's fixed-order reduction. No Δ or separate table-gradient pass."""
    if mode == "deterministic":
        request.getfixturevalue("deterministic")
    module = importlib.import_module("attnsr.kernels.window_attention")
    names = []
    interface = triton.runtime.jit.KernelInterface
    plain = interface.__getitem__

    def counted(self, grid):
        names.append(getattr(self, "__name__", None) or self.fn.__name__)
        return plain(self, grid)

    q, k, v, leaf = _qkv("swinir", 1, 8, 8, 8, torch.float32)
    table = _table((window, window), 1, torch.float32) if bias else None
    monkeypatch.setattr(interface, "__getitem__", counted)
    out = window_attention(q, k, v, window_size=window, shift_size=window // 2, heads=1, bias_table=table)
    torch.autograd.grad(out, (leaf, table) if bias else leaf, torch.randn_like(out))
    one_block = module._config("dkdv", 8, torch.float32, window * window)[0]["BLOCK_N"] >= window * window
    want = ["_win_fwd_kernel", "_win_bwd_dkdv_kernel", *([] if one_block else ["_win_bwd_dq_kernel"]),
            *(["_win_dbias_reduce_kernel"] if bias else [])]
    assert names == want


def test_only_the_table_gradient_when_only_it_is_asked():
    q, k, v, _ = _qkv("nhwc", 1, 8, 8, 8, torch.float32)
    table = _table((4, 4), 2, torch.float32)
    out = window_attention(q.detach(), k.detach(), v.detach(), window_size=4, shift_size=2, heads=2, bias_table=table)
    ref = window_attention_ref(q.detach(), k.detach(), v.detach(), window_size=4, shift_size=2, heads=2,
                               bias_table=table, upcast=True)
    grad = torch.randn_like(out)
    assert_close_rel(torch.autograd.grad(out, table, grad)[0], torch.autograd.grad(ref, table, grad.double())[0],
                     torch.float32, "d bias_table")


def test_relative_position_index_is_swins():
    """Swin's table index for a 2×3 window, written out: (Δy + 1)·5 + (Δx + 2)."""
    idx = relative_position_index((2, 3))
    assert idx.shape == (6, 6)
    assert idx[0].tolist() == [7, 6, 5, 2, 1, 0] and idx[5].tolist() == [14, 13, 12, 9, 8, 7]
    assert int(idx.max()) == 14 and int(idx.min()) == 0


@pytest.mark.parametrize("change,error,message", [  # a bad value is a ValueError, a bad type a TypeError
    (dict(window_size=3), ValueError, "window_size 3×3 does not divide the map's H×W = 8×8"),
    (dict(shift_size=4), ValueError, "shift_size 4×4 must be smaller than the window 4×4"),
    (dict(heads=3), ValueError, "heads = 3 does not divide C = 8"),
    (dict(bias_table=torch.zeros(48, 2)), ValueError,
     r"bias_table is \(48, 2\); expected \(49, 2\) for a 4×4 window and 2 heads"),
    (dict(mask=torch.zeros(4, 16, 15)), ValueError,
     r"mask is \(4, 16, 15\); expected \(M, N, N\) with N = 16 and M ≥ 1 dividing the batch's 4 windows"),
    (dict(mask=torch.zeros(8, 16, 16)), ValueError, r"mask is \(8, 16, 16\); expected \(M, N, N\)"),
    (dict(mask=torch.zeros(0, 16, 16)), ValueError, r"mask is \(0, 16, 16\); expected \(M, N, N\)"),
    (dict(mask=torch.zeros(4, 16, 16, dtype=torch.bool)), TypeError, "mask has dtype torch.bool; expected one of"),
    (dict(window_size=(4, 4, 4)), ValueError,
     r"window_size = \(4, 4, 4\) has 3 values; expected an int or a pair of ints"),
    (dict(window_size=(4.0, 4)), TypeError, "window_size must be an int or a pair of ints, got"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite real number or None, got nan"),
])
def test_bad_input_says_what_was_given_and_expected(change, error, message):
    q = torch.randn(1, 8, 8, 8, device=DEVICE)
    kwargs = dict(window_size=4, shift_size=0, heads=2)
    kwargs.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in change.items()})
    with pytest.raises(error, match=message):
        window_attention(q, q, q, **kwargs)


def test_mismatched_maps_are_refused():
    q = torch.randn(1, 8, 8, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"q is \(1, 8, 8, 8\) but k is \(1, 8, 4, 8\)"):
        window_attention(q, q[:, :, :4], q, window_size=4)


def test_custom_ops_pass_opcheck():
    from attnsr.kernels.window_attention import _window_backward_op, _window_op

    qkv = torch.randn(1, 4, 6, 3 * 4, device=DEVICE, requires_grad=True)
    q, k, v = qkv.split(4, -1)
    table = torch.randn(15, 2, device=DEVICE, requires_grad=True)
    mask = torch.randn(4, 6, 6, device=DEVICE)
    for args in ((q, k, v, table, None, [2, 3], [1, 1], 2, 0.5, True),
                 (q, k, v, None, mask, [2, 3], [1, 1], 1, 0.3, True),
                 (q, k, v, table, None, [2, 3], [1, 1], 2, 0.5, False)):
        result = torch.library.opcheck(_window_op, args)
        assert all(r == "SUCCESS" for r in result.values()), result
    q, k, v, table = (t.detach() for t in (q, k, v, table))  # the backward op has no derivative itself
    out, lse = _window_op(q, k, v, table, None, [2, 3], [1, 1], 2, 0.5, True)
    do = torch.randn_like(out)
    for need_qkv, need_table in ((True, True), (False, True), (True, False)):
        args = (do, q, k, v, out, lse, table, None, [2, 3], [1, 1], 2, 0.5, True, need_qkv, need_table)
        result = torch.library.opcheck(_window_backward_op, args)
        assert all(r == "SUCCESS" for r in result.values()), result


def test_torch_compile_dynamic_changes_of_image_size_do_not_recompile():
    """The published SwinIR code breaks under dynamic shapes on a data-dependent reshape; the op
    takes any image size (multiple of the window) without a new graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # AOTAutograd traces the backward too
    table = _table((4, 4), 2, torch.float32)

    @torch.compile(dynamic=True, fullgraph=True, backend=counter)
    def layer(x):
        q, k, v = x.split(8, -1)
        return window_attention(q, k, v, window_size=4, shift_size=2, heads=2, bias_table=table)

    for h, w in ((8, 12), (12, 16), (16, 8)):  # not square first: equal sizes would share one symbol
        x = torch.randn(1, h, w, 24, device=DEVICE, requires_grad=True)
        ref = window_attention_ref(*x.split(8, -1), window_size=4, shift_size=2, heads=2, bias_table=table,
                                   upcast=True)
        out = layer(x)
        assert_close_rel(out, ref, torch.float32, f"compiled output at {h}×{w}")
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, table), grad)
        want = torch.autograd.grad(ref, (x, table), grad.double())
        assert_close_rel(got[0], want[0], torch.float32, f"compiled dqkv at {h}×{w}")
        assert_close_rel(got[1], want[1], torch.float32, f"compiled d bias_table at {h}×{w}")
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for three image sizes"
