"""Running trained networks on whole images: padding to the network's multiple, tiling, the two tasks.

Tiling. An image too large to run at once is cut into tiles of ``tile × tile`` input pixels on a
grid with stride ``tile − overlap``; the last tile on each axis is flush with the (padded) image's
edge. Each tile's output is multiplied by a window w(y, x) = w_y(y)·w_x(x), added into a full-size
output buffer, and the buffer is divided by Σ w over all tiles. Along one axis a tile's window is 1
at an edge that is the image's border; at an edge inside the image it is 0 for the outermost
q = overlap//4 input pixels (q·scale output pixels) and ramps linearly to 1 across the next
r = overlap//2 input pixels, sampled at output pixel centres: (k + ½)/(r·scale) for the k-th output
pixel of the ramp. A tile narrower than both ramps takes the smaller of its two edges' values.

Why tiled equals untiled for local networks: call fn's receptive radius R the farthest, in input
pixels along either axis, that an output pixel's value reaches into the input. Every output pixel
that a tile weights above 0 lies at least q input pixels inside each of the tile's interior edges,
so when R ≤ q the tile computes it from the same input pixels as the whole image does, and the
weighted mean of equal values is that value (to float rounding). Why Σ w never vanishes: along an
axis consecutive tiles start at most tile − overlap ≤ tile − 2q apart, so the part of one tile
weighted above 0, [start + q, start + tile − q), reaches the next tile's; the first tile starts at
the border and the last ends there. The grid is a product of the two axes' tiles, so Σ w is the
product of the two axes' sums, and is kept as two vectors.

Networks with strided stages (``multiple`` > 1: the inpainting network has two stride-2 stages,
multiple 4) are shift-equivariant only by whole multiples of their stride, so tiles start at
multiples of ``multiple``: the image is first padded to multiples of ``multiple`` (reflect, as a
single call pads it), ``tile`` is rounded down to a multiple of ``multiple`` and so is the stride
``tile − overlap`` (the tiles then overlap by at least ``overlap``), and the last tile is flush with
the padded edge. The output is cropped back to the image's size times ``scale``. Window-attention
networks (SwinIR, HAT: :mod:`attnsr.published`) take their window as ``multiple``: each tile's
windows then lie on the whole image's window grid. ``minimum`` (a network's smallest input) pads a
smaller image up to it first and bounds the tile from below.

Limits: both networks contain global operations -- channel attention pools over the whole feature
map, and the inpainting network's self-attention attends over all pixels -- so a tile sees only its
own pixels and tiling them is an approximation, chosen to bound memory. ``tile=None`` (the
default) runs the whole image at once. Memory while tiling: one tile of input and output beside
the full output buffer (float32, or float64 for a float64 network) on the input's device, the two
weight vectors, and a padded copy of the input when its size is not a multiple of ``multiple``.
"""

import torch
import torch.nn.functional as F

from attnsr.data import inpaint_blend, inpaint_input

INPAINT_MULTIPLE = 4  # ImageInpaintingModel halves the resolution twice


def _pad_axis(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Pad ``x`` (B, C, H, W) by ``pad`` at the end of ``dim`` (-2 or -1): reflect, or replicate when
    the axis is too short to reflect (``pad`` ≥ its length)."""
    if pad == 0:
        return x
    mode = "reflect" if pad < x.shape[dim] else "replicate"
    return F.pad(x, (0, pad, 0, 0) if dim == -1 else (0, 0, 0, pad), mode=mode)


def pad_to_multiple(x: torch.Tensor, multiple: int, *, minimum: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad at the bottom and right to multiples of ``multiple``; return the padded tensor and (H, W).

    Reflect padding; along an axis too short to reflect (padding ≥ its length) replicate padding.
    With ``minimum``, an axis shorter than ``minimum`` is first padded to ``minimum``, then to the
    next multiple (two pads, as spandrel pads to a network's minimum size and the network pads to
    its window). With ``multiple=1`` and no axis below ``minimum``, or when H and W are already
    multiples of at least ``minimum``, ``x`` itself is returned.

    x: (B, C, H, W) -> ((B, C, H', W'), (H, W)), H' the next multiple of ``multiple`` from max(H, minimum).
    """
    if multiple < 1:
        raise ValueError(f"pad_to_multiple: multiple must be at least 1, got {multiple}")
    if minimum < 0:
        raise ValueError(f"pad_to_multiple: minimum must be at least 0, got {minimum}")
    if x.dim() != 4:
        raise ValueError(f"pad_to_multiple: x is {tuple(x.shape)}; expected (B, C, H, W)")
    h, w = x.shape[-2:]
    for dim in (-2, -1):
        x = _pad_axis(x, max(minimum - x.shape[dim], 0), dim=dim)
        x = _pad_axis(x, -x.shape[dim] % multiple, dim=dim)
    return x, (h, w)


def _axis_tiles(length: int, tile: int, stride: int, overlap: int, scale: int, *, device):
    """The tiles along one axis of ``length`` input pixels, with their blending windows.

    Returns [(start, size, window)], start and size in input pixels, window float32 (size·scale,) in
    output pixels: 1 at the image's borders, 0 then a linear ramp at interior edges (see the module
    notes). The windows' own rounding does not matter: the same values weight the sum and divide it.
    """
    dtype = torch.float32
    size = min(tile, length)
    starts = [*range(0, length - size, stride), length - size]
    zero, ramp = (overlap // 4) * scale, (overlap // 2) * scale
    centre = torch.arange(size * scale, device=device, dtype=dtype) + 0.5
    tiles = []
    for start in starts:
        window = torch.ones(size * scale, device=device, dtype=dtype)
        if ramp > 0 and start > 0:
            window = torch.minimum(window, ((centre - zero) / ramp).clamp(0, 1))
        if ramp > 0 and start + size < length:
            window = torch.minimum(window, ((size * scale - centre - zero) / ramp).clamp(0, 1))
        tiles.append((start, size, window))
    return tiles


def _window_sum(tiles, length: int, scale: int, dtype) -> torch.Tensor:
    """Σ over one axis's tiles (from :func:`_axis_tiles`) of their windows: (length·scale,) in ``dtype``."""
    total = torch.zeros(length * scale, device=tiles[0][2].device, dtype=dtype)
    for start, size, window in tiles:
        total[start * scale : (start + size) * scale] += window.to(dtype)
    return total


def check_tiling(tile: int, overlap: int, multiple: int = 1, minimum: int = 0) -> tuple[int, int]:
    """Validate the tiling arguments of :func:`tiled_apply` (ValueError); return (tile rounded down to
    a multiple of ``multiple``, stride)."""
    if overlap < 0:
        raise ValueError(f"tiled_apply: overlap must be at least 0, got {overlap}")
    if tile <= overlap:
        raise ValueError(f"tiled_apply: tile {tile} must be larger than overlap {overlap}")
    size = tile - tile % multiple
    if size < minimum:
        raise ValueError(f"tiled_apply: tile {tile} rounded down to a multiple of {multiple} is {size}, "
                         f"smaller than the network's minimum input {minimum}; use a tile of at least {minimum}")
    if size <= overlap:
        raise ValueError(f"tiled_apply: tile {tile} rounded down to a multiple of {multiple} is {size}, "
                         f"which is not larger than overlap {overlap}; use a larger tile or a smaller overlap")
    stride = (size - overlap) - (size - overlap) % multiple
    if stride == 0:
        raise ValueError(f"tiled_apply: tile {size} − overlap {overlap} = {size - overlap} is less than "
                         f"multiple {multiple}; tiles must advance by a multiple of {multiple} pixels "
                         "(use a larger tile or a smaller overlap)")
    return size, stride


def tiled_apply(fn, x: torch.Tensor, *, tile: int | None, overlap: int = 32, scale: int = 1,
                multiple: int = 1, minimum: int = 0) -> torch.Tensor:
    """Apply ``fn`` to ``x`` whole or in overlapping tiles blended without seams (see the module notes).

    ``fn`` maps (B, C, h, w) with h and w multiples of ``multiple`` to (B, C', h·scale, w·scale); it
    may run elsewhere (move each tile to a GPU and return it there): the output is on x's device.
    With ``tile=None``, or when the padded image fits in one tile, ``fn`` is called once on the image
    padded to multiples of ``multiple``, of at least ``minimum`` pixels (:func:`pad_to_multiple`).
    Otherwise tiles of ``tile × tile`` input pixels (``tile`` rounded down to a multiple of
    ``multiple``, at least ``minimum``) on a grid with stride ``tile − overlap`` (rounded down to a
    multiple of ``multiple``); the output equals the untiled output to float rounding when fn's
    receptive radius is at most ``overlap // 4``. The output has fn's dtype; tiles are accumulated on
    x's device in float32 (float64 when fn returns float64). Call it under ``torch.no_grad()``.

    x: (B, C, H, W) -> (B, C', H·scale, W·scale).
    """
    if x.dim() != 4 or x.shape[-2] == 0 or x.shape[-1] == 0:
        raise ValueError(f"tiled_apply: x is {tuple(x.shape)}; expected (B, C, H, W) with H, W ≥ 1")
    if scale < 1:
        raise ValueError(f"tiled_apply: scale must be at least 1, got {scale}")
    if multiple < 1:
        raise ValueError(f"tiled_apply: multiple must be at least 1, got {multiple}")
    if tile is not None:
        tile, stride = check_tiling(tile, overlap, multiple, minimum)
    padded, (h, w) = pad_to_multiple(x, multiple, minimum=minimum)
    hp, wp = padded.shape[-2:]

    def run(part):
        out = fn(part)
        want = (part.shape[0], part.shape[-2] * scale, part.shape[-1] * scale)
        if out.dim() != 4 or (out.shape[0], *out.shape[-2:]) != want:
            raise ValueError(f"tiled_apply: fn mapped {tuple(part.shape)} to {tuple(out.shape)}; expected "
                             f"({want[0]}, C', {want[1]}, {want[2]}) for scale {scale}")
        return out

    if tile is None or (hp <= tile and wp <= tile):
        return run(padded)[..., : h * scale, : w * scale].to(x.device)

    rows = _axis_tiles(hp, tile, stride, overlap, scale, device=x.device)
    cols = _axis_tiles(wp, tile, stride, overlap, scale, device=x.device)
    out = None
    for y0, th, wy in rows:
        for x0, tw, wx in cols:
            part = run(padded[..., y0 : y0 + th, x0 : x0 + tw].contiguous())
            if out is None:
                out_dtype = part.dtype
                acc = torch.promote_types(out_dtype, torch.float32)
                out = torch.zeros(x.shape[0], part.shape[1], hp * scale, wp * scale, device=x.device, dtype=acc)
            region = out[..., y0 * scale : (y0 + th) * scale, x0 * scale : (x0 + tw) * scale]
            region.addcmul_(part.to(x.device, acc), wy.to(acc)[:, None] * wx.to(acc))
    out.div_(_window_sum(rows, hp, scale, acc)[:, None]).div_(_window_sum(cols, wp, scale, acc))
    return out[..., : h * scale, : w * scale].to(out_dtype)


def _placement(model, image: torch.Tensor, device):
    """(device, dtype) to run ``model`` on: ``device`` or the model's own, and its parameters' dtype."""
    param = next(model.parameters(), None)
    if device is None:
        device = param.device if param is not None else image.device
    dtype = param.dtype if param is not None and param.is_floating_point() else image.dtype
    return torch.device(device), dtype


def _run_eval(model, fn):
    """Call ``fn()`` with ``model`` in eval mode; restore its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        return fn()
    finally:
        model.train(was_training)


@torch.no_grad()
def upscale(model, image: torch.Tensor, *, scale: int, tile: int | None = None, overlap: int = 32,
            device=None, multiple: int = 1, minimum: int = 0) -> torch.Tensor:
    """Super-resolve one image with ``model`` (an :class:`~attnsr.models.AttentionSRNet` or any network
    that upscales by ``scale``); the output is clamped to [0, 1] and returned as float32 on the CPU.

    The model is moved to ``device`` (default: where its parameters are) and run in eval mode (its
    training flag is restored afterwards), in its parameters' dtype. ``tile`` bounds the pixels per
    call (see :func:`tiled_apply`); the image and the output stay on the image's device and each tile
    is moved to ``device``. The network's channel attention pools over the whole map, so a tiled
    result approximates the untiled one; ``tile=None``, the default, runs the whole image.
    ``multiple`` and ``minimum`` are the input sizes the network takes (a published network's size
    requirements and window: :mod:`attnsr.published`): the image, or each tile, is padded to them
    and tiles start at multiples of ``multiple`` (see :func:`tiled_apply`).

    image: (C, H, W) in [0, 1], C the model's channels (3 for RGB) -> (C, scale·H, scale·W) in [0, 1].
    """
    if image.dim() != 3:
        raise ValueError(f"upscale: image is {tuple(image.shape)}; expected (C, H, W)")
    if scale < 1:
        raise ValueError(f"upscale: scale must be at least 1, got {scale}")
    device, dtype = _placement(model, image, device)
    model.to(device)

    def fn(part):
        out = model(part.to(device, dtype, copy=True))  # a copy: some networks scale their input in place (RCAN)
        h, w = part.shape[-2:]
        if tuple(out.shape[-3:]) != (part.shape[1], h * scale, w * scale):
            raise ValueError(f"upscale: the model maps a {tuple(part.shape[1:])} input to {tuple(out.shape[1:])}; "
                             f"expected {(part.shape[1], h * scale, w * scale)} for scale {scale} -- does the "
                             f"model upscale ×{scale}?")
        return out

    out = _run_eval(model, lambda: tiled_apply(fn, image[None], tile=tile, overlap=overlap, scale=scale,
                                               multiple=multiple, minimum=minimum))
    return out[0].clamp(0, 1).float().cpu()


@torch.no_grad()
def inpaint(model, image: torch.Tensor, mask: torch.Tensor, *, tile: int | None = None, overlap: int = 32,
            device=None) -> torch.Tensor:
    """Fill the holes of one image with ``model`` (an :class:`~attnsr.models.ImageInpaintingModel` with
    ``in_channels=4``); returned as float32 on the CPU.

    The network sees :func:`attnsr.data.inpaint_input` padded (reflect) to multiples of 4, for its two
    stride-2 stages; its prediction, cropped back, is blended with :func:`attnsr.data.inpaint_blend`,
    and the known pixels (mask 0) are returned exactly as given. Model placement and eval mode as in
    :func:`upscale`. The network's self-attention is global, so a tiled result approximates the
    untiled one; ``tile=None``, the default, runs the whole image (attention memory grows as (H·W)²).

    image: (3, H, W) in [0, 1]; mask: (1, H, W), 1 = hole -> (3, H, W) in [0, 1].
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"inpaint: image is {tuple(image.shape)}; expected (3, H, W)")
    if mask.dim() != 3 or mask.shape[0] != 1 or mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"inpaint: mask is {tuple(mask.shape)} but image is {tuple(image.shape)}; "
                         f"expected a mask (1, {image.shape[-2]}, {image.shape[-1]}) of the image's size")
    device, dtype = _placement(model, image, device)
    model.to(device)
    image, mask = image.float(), mask.to(image.device, torch.float32)
    x = inpaint_input(image[None], mask[None])

    def fn(part):
        return model(part.to(device, dtype, copy=True))  # a copy: some networks scale their input in place (RCAN)

    pred = _run_eval(model, lambda: tiled_apply(fn, x, tile=tile, overlap=overlap, multiple=INPAINT_MULTIPLE))
    out = inpaint_blend(pred.float(), image[None], mask[None])[0]
    return torch.where(mask == 0, image, out).cpu()  # the known pixels even if the prediction is not finite
