"""attnsr.WindowAttention and its variants: SwinIR's parameter names and state_dict, its forward on
partitioned windows with a mask, the whole-map path the fused blocks use, every backend against
the naive one (the triton backend in fp32 against float64), and bad input. The published
architectures themselves are in test_spandrel.py."""

import pytest
import torch
from conftest import DEVICE
from tolerances import assert_close_rel

import attnsr
import attnsr.backends
from attnsr.kernels.reference import relative_position_index, swin_shift_mask

SWINIR_KEYS = ["relative_position_bias_table", "relative_position_index", "qkv.weight", "qkv.bias", "proj.weight",
               "proj.bias"]


def _layer(cls=attnsr.WindowAttention, dim=20, window=4, heads=2, dtype=torch.float64, backend="naive"):
    torch.manual_seed(0)
    layer = cls(dim, window, heads, backend=backend)
    with torch.no_grad():  # drawn in float64 whatever the layer's dtype, so that layers compare
        table = layer.relative_position_bias_table
        table.copy_(torch.randn(table.shape, dtype=torch.float64) * 0.5)
    return layer.to(DEVICE, dtype)


def _grads(layer, x, *args):
    layer.zero_grad()
    x = x.detach().requires_grad_()
    y = layer(x, *args)
    y.backward(torch.linspace(-1, 1, y.numel(), device=y.device, dtype=y.dtype).view_as(y))
    return [y, x.grad] + [p.grad.clone() for p in layer.parameters()]


def test_state_dict_has_swinirs_keys_and_a_swinir_checkpoint_loads():
    layer = _layer()
    assert list(layer.state_dict()) == SWINIR_KEYS
    assert torch.equal(layer.relative_position_index.cpu(), relative_position_index((4, 4)))
    other = _layer()
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in other.state_dict().items()}
    layer.load_state_dict(state)
    assert torch.equal(layer.qkv.weight, state["qkv.weight"])


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backends_match_naive_on_partitioned_windows(backend, masked):
    """forward(x, mask) on (nW·B, N, C) windows: output and every gradient (the table's too); the
    triton backend runs fp32 against the naive backend in float64."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    naive = _layer()
    layer = _layer(dtype=dtype, backend=backend)
    x = torch.randn(6, 16, 20, device=DEVICE, dtype=torch.float64)
    mask = (torch.randn(3, 16, 16, device=DEVICE, dtype=torch.float64) * 3,) if masked else ()
    want = _grads(naive, x, *mask)
    got = _grads(layer, x.to(dtype), *(m.to(dtype) for m in mask))
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close_rel(g, w, dtype, f"{backend}: {['output', 'dx'][i] if i < 2 else 'parameter gradient'}")


@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
def test_shifted_map_equals_swins_roll_partition_and_mask(backend):
    """forward_map(x, shift) on the whole map is SwinIR's roll, partition into windows, attention
    with Swin's mask, reverse and roll back."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    layer = _layer(dtype=dtype, backend=backend)
    x = torch.randn(2, 8, 12, 20, device=DEVICE, dtype=dtype)
    got = layer.forward_map(x, 2)
    ref = _layer(backend="naive")
    rolled = torch.roll(x.double(), (-2, -2), (1, 2))
    windows = rolled.view(2, 2, 4, 3, 4, 20).permute(0, 1, 3, 2, 4, 5).reshape(12, 16, 20)
    out = ref(windows, swin_shift_mask(8, 12, 4, 2, dtype=torch.float64, device=DEVICE))
    out = out.view(2, 2, 3, 4, 4, 20).permute(0, 1, 3, 2, 4, 5).reshape(2, 8, 12, 20)
    assert_close_rel(got, torch.roll(out, (2, 2), (1, 2)), dtype, f"{backend}: shifted map")


def test_rpi_and_qkv_variants_take_the_callers_index_and_projection():
    layer = _layer()
    rpi_layer = _layer(attnsr.WindowAttentionRPI)
    qkv_layer = _layer(attnsr.WindowAttentionQKV)
    x = torch.randn(4, 16, 20, device=DEVICE, dtype=torch.float64)
    rpi = relative_position_index(4).to(DEVICE)
    assert torch.equal(rpi_layer(x, rpi), layer(x))
    assert torch.equal(qkv_layer(layer.qkv(x), rpi), layer(x))
    with pytest.raises(ValueError, match=r"relative position index passed in is not Swin's for a \(4, 4\) window"):
        rpi_layer(x, rpi.flip(0))


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_every_backend_checks_the_arguments_as_the_kernel_does(backend):
    q = torch.randn(2, 8, 8, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"mask is \(3, 16, 16\); expected \(M, N, N\) with N = 16 and M ≥ 1 "
                                         "dividing the batch's 8 windows"):
        attnsr.backends.window_attention(q, q, q, window_size=4, heads=2, mask=torch.zeros(3, 16, 16),
                                         backend=backend)
    with pytest.raises(ValueError, match="shift_size 4×4 must be smaller than the window 4×4"):
        attnsr.backends.window_attention(q, q, q, window_size=4, shift_size=4, backend=backend)


def test_bad_input_says_what_was_given_and_expected():
    with pytest.raises(ValueError, match=r"attn_drop = 0\.1; attention dropout is not fused, expected 0\.0"):
        attnsr.WindowAttention(20, 4, 2, attn_drop=0.1)
    with pytest.raises(ValueError, match="num_heads = 3 does not divide dim = 20"):
        attnsr.WindowAttention(20, 4, 3)
    with pytest.raises(ValueError, match=r"got windows of 12 tokens; expected Wh·Ww = 16"):
        _layer()(torch.randn(2, 12, 20, device=DEVICE, dtype=torch.float64))
