"""`attnsr upscale` on published checkpoints: small SwinIR, HAT, DRCT, Swin2SR and RCAN networks saved
as plain state_dicts (.pth; one as .safetensors), recognised and loaded by spandrel, attnsr's layers
swapped in, run whole and in tiles, and compared with spandrel's own output (the descriptor called
on the same image, float32, CPU).

Whole-image runs compute what spandrel computes: attnsr pads the image as spandrel does (its
multiple and minimum size) and the network pads the rest its own way, so the two differ by float
rounding only (relative error against fp32's bound
of tolerances.py; the 8-bit PNGs by at most one level, where a value sits on a rounding boundary).
Tiled runs are exact only when one tile covers the image: the receptive field of these networks is
the whole image (shifted windows chain across blocks; channel attention pools over the whole map),
so tiles that see part of it approximate it -- see test_tiles_lie_on_the_window_grid for the bound.

spandrel needs torchvision, whose wheels do not import beside the CPU torch wheel of the main test
environment; `make test` runs this file in a second environment (.venv-models, see the Makefile).
"""

import sys

import pytest
import torch
from conftest import error_line
from tolerances import assert_close_rel

from attnsr import cli, infer, swap_attention
from attnsr.images import read_image, to_uint8, write_image
from attnsr.published import EXTRA, load_published

spandrel = pytest.importorskip("spandrel", reason="spandrel is not installed (`make test` runs this file in "
                                                  ".venv-models)")
from published_models import build  # noqa: E402

ARCHS = ("SwinIR", "HAT", "DRCT", "Swin2SR", "RCAN")
# (tile multiple: the window or spandrel's multiple_of, spandrel's minimum size)
SIZES = {"SwinIR": (8, 16), "HAT": (4, 16), "DRCT": (16, 0), "Swin2SR": (4, 16), "RCAN": (1, 0)}
SWAPPED = {"SwinIR": {"SwinBlock", "WindowAttention"},  # what the swap puts in
           "HAT": {"HybridAttentionBlock", "WindowAttentionRPI", "ChannelAttention"},
           "DRCT": {"SwinBlock", "WindowAttention"},
           "Swin2SR": {"SwinV2Block", "WindowAttentionV2"},
           "RCAN": {"ChannelAttention"}}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """{arch: (path of its .pth, the network that was saved)}; weights nudged off the published init
    (which zeroes some tables and biases) so that every term counts."""
    folder = tmp_path_factory.mktemp("published")
    nets = {}
    for arch in ARCHS:
        net = build(arch)
        path = folder / f"{arch}_x2.pth"
        torch.save(net.state_dict(), path)
        nets[arch] = (str(path), net)
    return nets


def _image(h, w, seed=1):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def _png(path, h, w):
    """A PNG of h×w random pixels and the image as read back (what the CLI sees)."""
    write_image(_image(h, w), path)
    return str(path), read_image(path)


def _spandrel_output(path, image):
    """spandrel's own result: the descriptor (its padding, the published layers, its clamp) on image."""
    descriptor = spandrel.ModelLoader().load_from_file(path)
    return descriptor(image[None].clone())[0]  # a copy: RCAN scales its input in place


def _swapped(path, backend="torch"):
    net = load_published(path)
    swap_attention(net.net, backend=backend)
    return net


def _assert_png_matches(path, want, what):
    """The PNG at path against the float image want: at most one 8-bit level apart anywhere."""
    got = torch.from_numpy(to_uint8(read_image(path))).int()
    ref = torch.from_numpy(to_uint8(want)).int()
    assert got.shape == ref.shape, f"{what}: {tuple(got.shape)} != {tuple(ref.shape)}"
    diff = (got - ref).abs()
    worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    assert diff.max() <= 1, (f"{what}: {int((diff > 1).sum())} of {diff.numel()} 8-bit values more than one level "
                             f"off; worst at {worst}: got {int(got[worst])}, expected {int(ref[worst])}")


def _through_png(image, path):
    """image as the CLI would write it and read_image read it back."""
    write_image(image, path)
    return read_image(path)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_small_configurations_are_recognised(arch, published):
    """spandrel recognises each saved network as its architecture, ×2, and rebuilds a network that
    computes what the saved one computes; attnsr reads its tile multiple (the window) and minimum."""
    path, saved = published[arch]
    descriptor = spandrel.ModelLoader().load_from_file(path)
    assert (descriptor.architecture.name, descriptor.scale, descriptor.input_channels) == (arch, 2, 3)
    x = _image(16, 24)[None]
    with torch.no_grad():
        assert_close_rel(descriptor.model.eval()(x.clone()), saved(x.clone()), torch.float32, f"{arch}: rebuilt")
    net = load_published(path)
    assert (net.architecture, net.scale, net.multiple, net.minimum) == (arch, 2, *SIZES[arch])


@pytest.mark.parametrize("size", [(21, 30), (13, 11)], ids=["21x30", "13x11-below-minimum"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_whole_image_equals_spandrel(arch, size, published):
    """Whole image, float32: attnsr's padding and the swapped layers give spandrel's output. 21×30 is
    no multiple of either window; 13×11 is below SwinIR's and HAT's minimum of 16."""
    path, _ = published[arch]
    image = _image(*size)
    net = _swapped(path)
    assert {new for _, _, new in net.net.attnsr_swapped} == SWAPPED[arch]
    got = infer.upscale(net, image, scale=net.scale, multiple=net.pad_multiple, minimum=net.minimum)
    assert_close_rel(got, _spandrel_output(path, image), torch.float32, f"{arch} {size}")


@pytest.mark.parametrize("tile", [None, 32], ids=["whole", "one-tile"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_cli_upscale_equals_spandrel(arch, tile, published, tmp_path, capsys):
    """`attnsr upscale` on the .pth, whole and with a tile that covers the (padded) image: spandrel's
    output, and a report of what was swapped."""
    path, _ = published[arch]
    src, image = _png(tmp_path / "in.png", 21, 30)
    out = tmp_path / "out.png"
    args = ["upscale", src, "-o", str(out), "--checkpoint", path, "--backend", "torch", "--scale", "2"]
    assert cli.main(args + (["--tile", str(tile), "--overlap", "8"] if tile else [])) == 0
    _assert_png_matches(out, _spandrel_output(path, image), f"{arch} tile {tile}")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{path}: {arch} ×2 (spandrel") and lines[0].endswith("backend torch"), lines
    assert lines[1].startswith("  attnsr layers swapped in: ") and all(k in lines[1] for k in SWAPPED[arch]), lines
    if arch == "HAT":
        assert lines[2].startswith("  left as published: 1 OCAB (overlapping cross-attention"), lines
    assert lines[-1] == f"wrote {out} (60×42, ×2)"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tiles_lie_on_the_window_grid(arch, published, tmp_path):
    """Tiles of 32 with overlap 16 on a 40×44 image: every call of the network is on a multiple of
    its window and at least its minimum, and the tiled output approximates the whole-image one.
    Measured max |tiled − whole| (these weights): SwinIR 2.7e-4, HAT 1.1e-3, DRCT 1.3e-3, Swin2SR 1.3e-3,
    RCAN 2.5e-4; bound one 8-bit
    level, 1/255 = 3.9e-3. The CLI writes the same tiled result."""
    path, _ = published[arch]
    src, image = _png(tmp_path / "in.png", 40, 44)
    net = _swapped(path)
    sizes = []
    hook = net.net.register_forward_pre_hook(lambda module, args: sizes.append(tuple(args[0].shape[-2:])))
    tiled = infer.upscale(net, image, scale=2, tile=32, overlap=16, multiple=net.multiple, minimum=net.minimum)
    hook.remove()
    multiple, minimum = SIZES[arch]
    assert len(sizes) == 4, sizes  # 2×2 tiles of 32: rows 0 and 8, columns 0 and 12 (SwinIR: 16 of 48 padded)
    assert all(s % multiple == 0 and s >= minimum for size in sizes for s in size), sizes
    whole = infer.upscale(net, image, scale=2, multiple=net.pad_multiple, minimum=net.minimum)
    diff = (tiled - whole).abs()
    assert diff.max() <= 1 / 255, f"{arch}: tiled differs from whole by {diff.max():.3g} (mean {diff.mean():.3g})"
    out = tmp_path / "tiled.png"
    args = ["upscale", src, "-o", str(out), "--checkpoint", path, "--backend", "torch", "--tile", "32",
            "--overlap", "16"]
    assert cli.main(args) == 0
    assert torch.equal(read_image(out), _through_png(tiled, tmp_path / "want.png"))


@pytest.mark.parametrize("arch", ["SwinIR", "HAT"])
def test_cli_upscale_on_the_triton_backend(arch, published, tmp_path, capsys):
    """The fused Triton kernels (the interpreter on a CPU) in the published networks, on a 16×16
    image: spandrel's output."""
    path, _ = published[arch]
    src, image = _png(tmp_path / "in.png", 16, 16)
    out = tmp_path / "out.png"
    assert cli.main(["upscale", src, "-o", str(out), "--checkpoint", path, "--backend", "triton"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("backend triton")
    _assert_png_matches(out, _spandrel_output(path, image), f"{arch} on triton")


def test_cli_upscale_reads_safetensors(published, tmp_path):
    """Published weights are often shipped as .safetensors: the same network from that file."""
    from safetensors.torch import save_file

    _, net = published["SwinIR"]
    path = str(tmp_path / "SwinIR_x2.safetensors")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    src, image = _png(tmp_path / "in.png", 21, 30)
    out = tmp_path / "out.png"
    assert cli.main(["upscale", src, "-o", str(out), "--checkpoint", path, "--backend", "torch"]) == 0
    _assert_png_matches(out, _spandrel_output(published["SwinIR"][0], image), "SwinIR from .safetensors")


# ---- what cannot run: one line of error, exit status 2, no output file -----------------------------------------


def test_missing_spandrel_names_the_extra(published, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "spandrel", None)  # `import spandrel` now raises ImportError
    src, _ = _png(tmp_path / "in.png", 16, 16)
    out = tmp_path / "out.png"
    assert cli.main(["upscale", src, "-o", str(out), "--checkpoint", published["SwinIR"][0]]) == 2
    line = error_line(capsys)
    assert "is not an attnsr checkpoint" in line and "spandrel, which is not installed" in line, line
    assert line.endswith(EXTRA) and EXTRA == 'pip install "attnsr[models]"', line
    assert not out.exists()


@pytest.mark.parametrize("name, content, why", [
    ("unknown.pth", {"encoder.weight": torch.zeros(4, 3, 3, 3)}, "UnsupportedModelError"),
    ("junk.pth", b"\x00" * 64, "cannot read checkpoint"),
    ("weights.npz", {"conv_first.weight": torch.zeros(4, 3, 3, 3)}, "Unsupported model file extension .npz"),
])
def test_unloadable_checkpoint(name, content, why, tmp_path, capsys):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    src, _ = _png(tmp_path / "in.png", 16, 16)
    out = tmp_path / "out.png"
    assert cli.main(["upscale", src, "-o", str(out), "--checkpoint", str(path)]) == 2
    line = error_line(capsys)
    assert str(path) in line and "spandrel cannot load it either" in line and why in line, line
    assert "expected a checkpoint written by `attnsr train sr` or a super-resolution checkpoint" in line, line
    assert not out.exists()


def test_published_checkpoint_of_the_wrong_scale_or_tile(published, tmp_path, capsys):
    src, _ = _png(tmp_path / "in.png", 16, 16)
    out = tmp_path / "out.png"
    path = published["HAT"][0]
    assert cli.main(["upscale", src, "-o", str(out), "--checkpoint", path, "--scale", "4"]) == 2
    assert "upscales ×2; --scale asked for ×4" in error_line(capsys)
    assert cli.main(["upscale", src, "-o", str(out), "--checkpoint", path, "--tile", "14", "--overlap", "4"]) == 2
    line = error_line(capsys)
    assert "--tile for HAT: tile 14 rounded down to a multiple of 4 is 12, smaller than the network's minimum " \
           "input 16" in line, line
    assert not out.exists()


def test_a_network_that_pads_itself_its_own_way_equals_spandrel(tmp_path):
    """ATD pads to its window by mirroring, not by reflection: a whole image is padded only as
    spandrel pads it (its multiple_of), and the network pads the rest itself, as under spandrel."""
    path = str(tmp_path / "ATD_x2.pth")
    torch.save(build("ATD").state_dict(), path)
    published = load_published(path)
    assert published.architecture == "ATD" and published.multiple % 4 == 0
    swap_attention(published.net, backend="torch")
    image = _image(21, 30)
    got = infer.upscale(published, image, scale=2, multiple=published.pad_multiple, minimum=published.minimum)
    assert_close_rel(got, _spandrel_output(path, image), torch.float32, "ATD 21×30")


def test_a_restoration_checkpoint_at_scale_one(tmp_path, capsys):
    """SCUNet (denoising, ×1; spandrel's minimum 40, it pads itself to 64): `attnsr upscale` writes
    an image of the input's size equal to spandrel's, whole and in tiles on its window grid (8)."""
    path = str(tmp_path / "SCUNet.pth")
    torch.save(build("SCUNet").state_dict(), path)
    net = load_published(path)
    assert (net.architecture, net.scale, net.multiple, net.minimum) == ("SCUNet", 1, 8, 40)
    src, image = _png(tmp_path / "in.png", 45, 50)
    out = tmp_path / "out.png"
    assert cli.main(["upscale", src, "-o", str(out), "--checkpoint", path, "--backend", "torch"]) == 0
    _assert_png_matches(out, _spandrel_output(path, image), "SCUNet whole")
    lines = capsys.readouterr().out.splitlines()
    assert "WindowAttentionMap" in lines[1] and lines[-1] == f"wrote {out} (50×45, ×1)", lines
    swap_attention(net.net, backend="torch")
    sizes = []
    hook = net.net.register_forward_pre_hook(lambda module, args: sizes.append(tuple(args[0].shape[-2:])))
    tiled = infer.upscale(net, image, scale=1, tile=40, overlap=8, multiple=net.multiple, minimum=net.minimum)
    hook.remove()
    assert tiled.shape == image.shape and len(sizes) > 1, (tiled.shape, sizes)
    assert all(s % 8 == 0 and s >= 40 for size in sizes for s in size), sizes
