"""attnsr.infer: padding to a multiple, seamless tiling, and the two tasks on whole images.

Tiled equals untiled only for networks whose receptive radius is at most overlap//4, so every such
comparison measures the radius of its model first (it does not trust a hand count), and one
comparison with a too-small overlap shows that the check can fail. Tiled and untiled compute each
output pixel from the same input pixels with the same weights; they differ only in the convolutions'
summation order and the blend's normalisation, a few roundings, so the fp32 bound of tolerances.py
(relative L2 error 1e-5, float32 ε = 1.2e-7) and the float64 one (1e-10) hold with margin.
"""

import pytest
import torch
from conftest import DEVICE
from tolerances import assert_close_rel
from torch import nn

from attnsr.infer import _axis_tiles, _window_sum, inpaint, pad_to_multiple, tiled_apply, upscale
from attnsr.models import AttentionSRNet, ImageInpaintingModel


def _conv_net(scale=1):
    """Two 3×3 convs (radius 2), then PixelShuffle(scale) when scale > 1. SiLU keeps every input
    pixel's influence non-zero, so the measured radius is the true one."""
    c = 3 * scale * scale
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, c, 3, padding=1)]
    return nn.Sequential(*layers, *([nn.PixelShuffle(scale)] if scale > 1 else []))


def _strided_net():
    """A 3×3 conv, a stride-2 conv and a stride-2 transposed conv: H, W must be even."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.SiLU(), nn.ConvTranspose2d(8, 3, 3, stride=2, padding=1, output_padding=1))


NETS = {"conv": (_conv_net, 1, 1), "shuffle2": (lambda: _conv_net(2), 2, 1), "strided": (_strided_net, 1, 4)}


def _receptive_radius(net, scale, multiple, dtype):
    """Farthest, in input pixels along either axis, that changing one input pixel changes the output;
    over a multiple×multiple block of pixels, so a strided net shows every phase of its grid.

    A change counts above rounding noise (64 ε of the largest change): a GPU convolution may compute
    through transforms (FFT, Winograd) that spread a few ε of noise over the whole output, so an
    exact "changed at all" would measure the whole image. On an H200 the float64 strided network
    failed this test; the CPU computes convolutions directly and sees exact zeros either way."""
    size = 8 * max(multiple, 4)
    x = torch.randn(1, 3, size, size, device=DEVICE, dtype=dtype)
    base = net(x)
    radius = 0
    for dy in range(multiple):
        for dx in range(multiple):
            y0, x0 = size // 2 + dy, size // 2 + dx
            bumped = x.clone()
            bumped[..., y0, x0] += 1
            change = (net(bumped) - base).abs().amax(dim=(0, 1))
            changed = (change > 64 * torch.finfo(dtype).eps * change.max()).nonzero()
            assert len(changed), "the bump changed nothing: the measurement is broken"
            radius = max(radius, int((changed[:, 0] // scale - y0).abs().max()),
                         int((changed[:, 1] // scale - x0).abs().max()))
    return radius


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, size", [(1, (37, 53)), (2, (61, 29))])
@pytest.mark.parametrize("name", list(NETS))
def test_tiled_equals_untiled_for_local_networks(name, batch, size, dtype):
    make, scale, multiple = NETS[name]
    net = make().to(DEVICE, dtype)
    overlap = 12
    radius = _receptive_radius(net, scale, multiple, dtype)
    assert radius <= overlap // 4, f"{name}: measured receptive radius {radius} > overlap//4 = {overlap // 4}"
    x = torch.randn(batch, 3, *size, device=DEVICE, dtype=dtype)
    whole = tiled_apply(net, x, tile=None, scale=scale, multiple=multiple)
    assert whole.shape == (batch, 3, size[0] * scale, size[1] * scale)
    # 16: many tiles narrower than their two ramps (2·(3 + 6) = 18), the last one shifted back to the edge;
    # 21 (20 for multiple 4); 29: the width of 61×29 exactly (28 for multiple 4); 32: stride 20.
    for tile in (16, 21, 29, 32):
        tiled = tiled_apply(net, x, tile=tile, overlap=overlap, scale=scale, multiple=multiple)
        assert tiled.dtype == dtype
        assert_close_rel(tiled, whole, dtype, f"{name} {tuple(x.shape)} tile {tile} overlap {overlap}")


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiles_one_pixel_wider_than_the_overlap_equal_untiled(dtype):
    """tile = overlap + 1: stride 1, every pixel under up to 13 tiles, most of them weighted 0 there."""
    net = _conv_net().to(DEVICE, dtype)
    x = torch.randn(1, 3, 20, 23, device=DEVICE, dtype=dtype)
    tiled = tiled_apply(net, x, tile=13, overlap=12)
    assert_close_rel(tiled, net(x), dtype, "tile 13 overlap 12")


@torch.no_grad()
def test_tiling_a_network_wider_than_a_quarter_overlap_leaves_seams():
    """The control: the same comparison fails when the radius (2) exceeds overlap//4 (1)."""
    net = _conv_net().to(DEVICE)
    x = torch.randn(1, 3, 37, 53, device=DEVICE)
    whole = tiled_apply(net, x, tile=None)
    tiled = tiled_apply(net, x, tile=16, overlap=4)
    with pytest.raises(AssertionError, match="relative error"):
        assert_close_rel(tiled, whole, torch.float32, "too small an overlap")


@pytest.mark.parametrize("length, tile, overlap, scale", [
    (17, 16, 8, 1),   # one pixel past a tile
    (17, 9, 8, 1),    # tile = overlap + 1: stride 1, nine tiles over every pixel
    (100, 33, 32, 3),
    (41, 8, 7, 2),
    (64, 16, 0, 1),   # no overlap: windows are all 1
    (23, 6, 3, 1),    # overlap//4 = 0, a one-pixel ramp
])
def test_window_sums_are_positive_everywhere(length, tile, overlap, scale):
    tiles = _axis_tiles(length, tile, tile - overlap, overlap, scale, device=DEVICE)
    assert tiles[0][0] == 0 and tiles[-1][0] + tiles[-1][1] == length, "tiles must reach both borders"
    total = _window_sum(tiles, length, scale, torch.float64)
    assert total.shape == (length * scale,)
    low = int(total.argmin())
    assert total[low] > 0, f"summed window is {total[low].item()} at output pixel {low} of {length * scale}"


@torch.no_grad()
@pytest.mark.parametrize("size, tile, overlap, multiple", [
    ((17, 17), 16, 8, 1), ((17, 40), 9, 8, 1), ((5, 30), 4, 3, 1), ((33, 9), 8, 4, 4), ((18, 31), 12, 8, 4),
])
def test_tiling_the_identity_reproduces_the_input(size, tile, overlap, multiple):
    """fn = identity has radius 0: the blend must return x (a zero weight sum would give NaN)."""
    x = torch.rand(2, 3, *size, device=DEVICE)
    out = tiled_apply(lambda t: t.clone(), x, tile=tile, overlap=overlap, multiple=multiple)
    assert torch.isfinite(out).all(), f"{int((~torch.isfinite(out)).sum())} non-finite pixels"
    assert_close_rel(out, x, torch.float32, f"identity {size} tile {tile} overlap {overlap}")


@torch.no_grad()
@pytest.mark.parametrize("tile", [None, 64, 40])
def test_no_tiling_is_one_call_on_the_padded_image(tile):
    net = _strided_net().to(DEVICE)
    x = torch.randn(1, 3, 37, 38, device=DEVICE)
    calls = []

    def fn(t):
        calls.append(tuple(t.shape))
        return net(t)

    out = tiled_apply(fn, x, tile=tile, overlap=8, multiple=4)
    padded, _ = pad_to_multiple(x, 4)
    assert calls == [(1, 3, 40, 40)]
    torch.testing.assert_close(out, net(padded)[..., :37, :38], rtol=0, atol=0)


def test_pad_to_multiple_reflects():
    x = torch.arange(5 * 7, dtype=torch.float32).reshape(1, 1, 5, 7)
    padded, size = pad_to_multiple(x, 4)
    assert size == (5, 7) and padded.shape == (1, 1, 8, 8)
    assert torch.equal(padded[..., :5, :7], x)
    assert torch.equal(padded[..., 5:, :7], x[..., [3, 2, 1], :]), "rows 5..7 must mirror rows 3, 2, 1"
    assert torch.equal(padded[..., :5, 7], x[..., 5]), "column 7 must mirror column 5"
    assert pad_to_multiple(x, 1)[0] is x
    assert pad_to_multiple(padded, 4)[0] is padded


def test_pad_to_multiple_replicates_where_too_small_to_reflect():
    x = torch.tensor([[[[1.0, 2.0]]]])  # 1×2: neither axis can reflect 3 or 2 pixels
    padded, size = pad_to_multiple(x, 4)
    assert size == (1, 2)
    assert torch.equal(padded, torch.tensor([[1.0, 2.0, 2.0, 2.0]]).expand(1, 1, 4, 4))
    y = torch.arange(3.0).reshape(1, 1, 3, 1)  # H reflects (pad 1 < 3), W replicates (pad 3 ≥ 1)
    padded, _ = pad_to_multiple(y, 4)
    assert torch.equal(padded, torch.tensor([0.0, 1.0, 2.0, 1.0]).reshape(1, 1, 4, 1).expand(1, 1, 4, 4))


def test_pad_to_multiple_pads_to_the_minimum_first():
    """Below ``minimum``: first reflect up to it, then to the multiple (as spandrel pads to a network's
    minimum and the network to its window); at or above it, ``minimum`` changes nothing."""
    x = torch.arange(5 * 9, dtype=torch.float32).reshape(1, 1, 5, 9)
    padded, size = pad_to_multiple(x, 4, minimum=7)
    assert size == (5, 9) and padded.shape == (1, 1, 8, 12)
    # to 7 rows: 5, 6 mirror 3, 2; to 8: row 7 mirrors row 5 of the 7, x's row 3 (one pad would give row 1)
    assert torch.equal(padded[..., :9], x[..., [0, 1, 2, 3, 4, 3, 2, 3], :])
    assert torch.equal(padded[..., :5, 9:], x[..., [7, 6, 5]]), "columns: no minimum to reach, one pad"
    assert pad_to_multiple(x, 1, minimum=5)[0] is x
    with pytest.raises(ValueError, match=r"minimum must be at least 0, got -1"):
        pad_to_multiple(x, 1, minimum=-1)


def test_tiled_apply_pads_to_the_minimum_and_keeps_tiles_above_it():
    calls = []
    x = torch.rand(1, 3, 10, 30)

    def fn(t):
        calls.append(tuple(t.shape[-2:]))
        return t

    out = tiled_apply(fn, x, tile=16, overlap=4, multiple=4, minimum=16)
    torch.testing.assert_close(out, x)  # the identity, blended
    assert calls and all(h >= 16 and w >= 16 for h, w in calls), calls
    with pytest.raises(ValueError, match=r"tile 18 rounded down to a multiple of 4 is 16, smaller than the "
                                         r"network's minimum input 20; use a tile of at least 20"):
        tiled_apply(fn, x, tile=18, overlap=4, multiple=4, minimum=20)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tile=8, overlap=8), r"tile 8 must be larger than overlap 8"),
    (dict(tile=16, overlap=-1), r"overlap must be at least 0, got -1"),
    (dict(tile=10, overlap=8, multiple=4), r"tile 10 rounded down to a multiple of 4 is 8, .* overlap 8"),
    (dict(tile=16, overlap=14, multiple=4), r"tile 16 − overlap 14 = 2 is less than multiple 4"),
    (dict(tile=16, scale=0), r"scale must be at least 1, got 0"),
    (dict(tile=16, multiple=0), r"multiple must be at least 1, got 0"),
])
def test_tiled_apply_rejects_bad_arguments(kwargs, message):
    kwargs = dict(overlap=4) | kwargs
    with pytest.raises(ValueError, match=message):
        tiled_apply(lambda t: t, torch.zeros(1, 3, 8, 8), **kwargs)


def test_tiled_apply_rejects_bad_inputs_and_outputs():
    with pytest.raises(ValueError, match=r"x is \(3, 8, 8\); expected \(B, C, H, W\)"):
        tiled_apply(lambda t: t, torch.zeros(3, 8, 8), tile=None)
    with pytest.raises(ValueError, match=r"fn mapped \(1, 3, 8, 8\) to \(1, 3, 8, 8\); expected \(1, C', 16, 16\)"):
        tiled_apply(lambda t: t, torch.zeros(1, 3, 8, 8), tile=None, scale=2)


def _sr_net(scale=2):
    return AttentionSRNet(num_features=8, num_blocks=1, scale=scale, backend="torch").to(DEVICE)


@pytest.mark.parametrize("tile", [None, 16])
def test_upscale_shape_and_range(tile):
    net = _sr_net().train()
    image = torch.rand(3, 21, 34)
    out = upscale(net, image, scale=2, tile=tile, overlap=8, device=DEVICE)
    assert out.shape == (3, 42, 68) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert 0 <= out.min() and out.max() <= 1
    assert net.training, "upscale must give the model back in the mode it had"
    if tile is not None:
        # Not equal: the channel attention pools per tile and the net's radius (8) exceeds overlap//4. A check
        # that the tiles land in place: the difference is a small part (0.1 % here) of the image's own variation.
        whole = upscale(net, image, scale=2, device=DEVICE)
        diff, spread = (out - whole).abs().mean(), (whole - whole.mean()).abs().mean()
        assert diff < 0.05 * spread, f"tiled differs from untiled by {diff:.3g}; the output varies by {spread:.3g}"


def test_upscale_rejects_a_model_of_another_scale():
    with pytest.raises(ValueError, match=r"maps a \(3, 10, 12\) input to \(3, 30, 36\); expected \(3, 20, 24\) "
                                         r"for scale 2 -- does the model upscale ×2\?"):
        upscale(_sr_net(scale=3), torch.rand(3, 10, 12), scale=2, device=DEVICE)


def _inpaint_case():
    net = ImageInpaintingModel(in_channels=4, backend="torch").to(DEVICE)
    image = torch.rand(3, 30, 42)
    mask = torch.zeros(1, 30, 42)
    mask[:, 8:20, 10:25] = 1
    return net, image, mask


@pytest.mark.parametrize("tile", [None, 24])
def test_inpaint_fills_holes_and_keeps_known_pixels(tile):
    net, image, mask = _inpaint_case()
    out = inpaint(net, image, mask, tile=tile, overlap=8, device=DEVICE)
    assert out.shape == (3, 30, 42) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert 0 <= out.min() and out.max() <= 1
    known = mask.expand_as(image) == 0
    assert torch.equal(out[known], image[known]), f"{int((out[known] != image[known]).sum())} known pixels changed"
    assert not torch.equal(out[~known], image[~known]), "the hole was not filled"


def test_inpaint_rejects_a_mask_of_another_size():
    net, image, _ = _inpaint_case()
    with pytest.raises(ValueError, match=r"mask is \(1, 30, 40\) but image is \(3, 30, 42\)"):
        inpaint(net, image, torch.zeros(1, 30, 40), device=DEVICE)
