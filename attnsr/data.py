"""Training data for the two networks: photographs, super-resolution pairs, inpainting masks.

Value ranges: photographs and super-resolution tensors are RGB in [0, 1]. The inpainting network
ends in Tanh, so its target and the image part of its input are in [-1, 1]; masks are 1 = hole.

Photographs come from a folder of PNG/JPEG files or from the photos bundled with scikit-image
(no download). A photo is ``(name, image)`` with image (3, H, W) float32 in [0, 1].

Super-resolution pairs are made the standard way: LR = bicubic downsampling of HR with
antialiasing (``F.interpolate(..., mode="bicubic", antialias=True)``, which matches MATLAB's
``imresize`` away from the borders), HR cropped to multiples of the scale first.

Training datasets draw every item from a ``torch.Generator`` seeded by ``(seed, epoch, index)``
alone: an item does not depend on the DataLoader's workers, the process or the order of calls,
so resuming and distributed training see the same data.

Inpainting masks are free-form brush strokes (random-walk polylines of thick round-capped
segments, as in the free-form masks of DeepFill v2) plus one to three boxes. A pixel at
(y, x) lies in a stroke segment a→b of radius r when its distance to the segment is ≤ r:
with t = clamp(((p − a)·(b − a)) / |b − a|², 0, 1), ``|p − a − t (b − a)| ≤ r`` (which gives
the round caps). Stroke widths and lengths scale with √(H·W), box sides with H and W; the hole
fraction is 25 % on average, typically 10–50 %, and every mask has at least one hole pixel and
at least one known pixel.
"""

import hashlib
import math
import os

import torch
import torch.nn.functional as F

from attnsr.images import IMAGE_SUFFIXES, InputError, read_image

Photo = tuple[str, torch.Tensor]  # (name, image (3, H, W) float32 in [0, 1])

# name -> (scikit-image function, index into its result or None); order fixed, cat (= chelsea) left out
_BUILTIN_SOURCES = {
    "astronaut": ("astronaut", None),
    "chelsea": ("chelsea", None),
    "coffee": ("coffee", None),
    "rocket": ("rocket", None),
    "motorcycle": ("stereo_motorcycle", 0),  # left view
    "immunohistochemistry": ("immunohistochemistry", None),
    "hubble_deep_field": ("hubble_deep_field", None),
    "retina": ("retina", None),
}
BUILTIN_PHOTOS: tuple[str, ...] = tuple(_BUILTIN_SOURCES)
DEFAULT_VAL = "chelsea"


# ----------------------------------------------------------------------------------------------
# photographs


def _builtin_photos() -> list[Photo]:
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError("the built-in photos need scikit-image: pip install scikit-image") from e
    photos = []
    for name, (function, index) in _BUILTIN_SOURCES.items():
        arr = getattr(skimage.data, function)()
        if index is not None:
            arr = arr[index]
        # (H, W, 3) uint8 -> (3, H, W) float32; torch.tensor copies (the bundled arrays are read-only)
        photos.append((name, torch.tensor(arr).permute(2, 0, 1).contiguous().float().div_(255.0)))
    return photos


def _folder_photos(folder: str) -> list[Photo]:
    if not os.path.exists(folder):
        raise InputError(f"photo folder {folder} does not exist; expected a folder of .png/.jpg images")
    if not os.path.isdir(folder):
        raise InputError(f"photo folder {folder} is not a folder; expected a folder of .png/.jpg images")
    names = []
    for root, _, files in os.walk(folder):
        for f in files:
            if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES:
                names.append(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"))
    if not names:
        raise InputError(
            f"photo folder {folder} holds no images; expected files ending in {', '.join(IMAGE_SUFFIXES)} "
            "(any case, subfolders included)"
        )
    return [(name, read_image(os.path.join(folder, name))) for name in sorted(names)]


def load_photos(source: str | os.PathLike | None = None) -> list[Photo]:
    """Load training/validation photos as ``[(name, image (3, H, W) float32 in [0, 1]), ...]``.

    ``source`` None or ``"builtin"``: the photos bundled with scikit-image, named and ordered as
    ``BUILTIN_PHOTOS``. Otherwise a folder: every .png/.jpg/.jpeg (any case) below it, recursively,
    sorted by relative path, each named by its relative path with ``/`` separators. Grey and RGBA
    files are converted to RGB.
    """
    if source is None or source == "builtin":
        return _builtin_photos()
    return _folder_photos(os.fspath(source))


def split_photos(photos: list[Photo], val: str | int = DEFAULT_VAL) -> tuple[list[Photo], list[Photo]]:
    """Split photos into (training, validation), each keeping the input order.

    ``val`` is comma-separated photo names (``"chelsea,coffee"``), or a count ``n`` (an int, or a
    string of digits that is not a photo name): the last ``n`` photos by name are held out.
    """
    names = [name for name, _ in photos]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"split_photos: photo names {', '.join(repeated)} repeat; expected unique names")
    if isinstance(val, str) and val.strip().isdigit() and val.strip() not in names:
        val = int(val)
    if isinstance(val, bool) or not isinstance(val, (int, str)):
        raise InputError(f"validation photos {val!r}: expected comma-separated photo names or a count")
    if isinstance(val, int):
        if not 0 < val < len(photos):
            raise InputError(
                f"validation count {val} with {len(photos)} photos; expected 1 to {len(photos) - 1} so that "
                "both splits keep a photo"
            )
        held = set(sorted(names)[-val:])
    else:
        held = {n.strip() for n in val.split(",") if n.strip()}
        unknown = sorted(held - set(names))
        if unknown:
            raise InputError(
                f"validation photo {', '.join(unknown)} not found; the available photos are {', '.join(names)}"
            )
        if not held:
            raise InputError(f"validation photos {val!r} names no photo; expected names from {', '.join(names)}")
        if len(held) == len(photos):
            raise InputError(f"validation photos {val!r} are all {len(photos)} photos; no training photo would remain")
    train = [p for p in photos if p[0] not in held]
    return train, [p for p in photos if p[0] in held]


# ----------------------------------------------------------------------------------------------
# super-resolution pairs


def _check_whole(value, what: str, name: str, minimum: int = 1) -> None:
    """InputError (a ValueError) unless ``value`` is an int ≥ ``minimum`` (bool and float rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{what}: {name} is {value!r}; expected a whole number ≥ {minimum}")


def _as_batch(img: torch.Tensor, what: str) -> torch.Tensor:
    if img.dim() not in (3, 4) or img.shape[-3] != 3:
        raise ValueError(f"{what}: image is {tuple(img.shape)}; expected (B, 3, H, W) or (3, H, W)")
    return img if img.dim() == 4 else img.unsqueeze(0)


def bicubic_down(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Antialiased bicubic downsampling by ``scale``, clamped to [0, 1].

    hr: (B, 3, H, W) or (3, H, W) with H and W multiples of ``scale`` -> (…, 3, H/scale, W/scale).
    """
    _check_whole(scale, "bicubic_down", "scale")
    x = _as_batch(hr, "bicubic_down")
    h, w = x.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(
            f"bicubic_down: image is {h}×{w} (H×W); expected H and W multiples of the scale {scale} (use sr_pair)"
        )
    lr = F.interpolate(x, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
    return lr if hr.dim() == 4 else lr.squeeze(0)


def bicubic_up(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """The bicubic baseline: upsampling by ``scale``, clamped to [0, 1].

    lr: (B, 3, h, w) or (3, h, w) -> (…, 3, h·scale, w·scale).
    """
    _check_whole(scale, "bicubic_up", "scale")
    x = _as_batch(lr, "bicubic_up")
    sr = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False).clamp_(0, 1)
    return sr if lr.dim() == 4 else sr.squeeze(0)


def sr_pair(hr: torch.Tensor, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop ``hr`` at the bottom and right to multiples of ``scale``; return (LR, cropped HR).

    hr: (B, 3, H, W) or (3, H, W) -> lr (…, 3, H//s, W//s), hr (…, 3, H//s·s, W//s·s).
    """
    _check_whole(scale, "sr_pair", "scale")
    h, w = _as_batch(hr, "sr_pair").shape[-2:]
    if h < scale or w < scale:
        raise ValueError(f"sr_pair: image is {h}×{w} (H×W); expected at least {scale}×{scale} for scale {scale}")
    hr = hr[..., : h - h % scale, : w - w % scale]
    return bicubic_down(hr, scale), hr


# ----------------------------------------------------------------------------------------------
# inpainting masks

# uniforms one mask may use: strokes 1 + 4·(5 + 6·2) = 69, boxes 1 + 3·4 = 13, fallback pixel 2
_MASK_UNIFORMS = 128


def _segments_mask(a: torch.Tensor, b: torch.Tensor, radius: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixels within ``radius`` of any segment a→b: a round-capped thick polyline, rasterised.

    a, b: (N, 2) segment ends as (y, x) in pixel-centre coordinates; radius: (N,) -> (H, W) bool.
    Segments are processed in chunks so that the (n, H, W) distance tensor stays ≤ 4 M elements.
    """
    ys = torch.arange(height, dtype=torch.float32).view(1, height, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, width)
    a, d, r2 = a.float(), (b - a).float(), radius.float().square()
    out = torch.zeros(height, width, dtype=torch.bool)
    chunk = max(1, (1 << 22) // (height * width))
    for s in range(0, a.shape[0], chunk):
        ay, ax = a[s : s + chunk, 0].view(-1, 1, 1), a[s : s + chunk, 1].view(-1, 1, 1)
        dy, dx = d[s : s + chunk, 0].view(-1, 1, 1), d[s : s + chunk, 1].view(-1, 1, 1)
        py, px = ys - ay, xs - ax
        t = ((py * dy + px * dx) / (dy * dy + dx * dx).clamp_min(1e-12)).clamp_(0, 1)
        dist2 = (py - t * dy).square_() + (px - t * dx).square_()
        out |= (dist2 <= r2[s : s + chunk].view(-1, 1, 1)).any(0)
    return out


def _stroke_segments(height: int, width: int, u) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2–4 random-walk brush strokes of 2–6 segments each, as (a (N, 2), b (N, 2), radius (N,)).

    ``u`` yields uniforms in [0, 1). Radius 2.5–7.5 % and segment length 10–30 % of √(H·W) (+0.5 px
    so the thinnest stroke still covers pixels); each turn is at most ±60°; vertices stay inside.
    """
    size = math.sqrt(height * width)
    a, b, radius = [], [], []
    for _ in range(2 + int(next(u) * 3)):
        r = (0.025 + 0.05 * next(u)) * size + 0.5
        y, x = next(u) * (height - 1), next(u) * (width - 1)
        angle = next(u) * 2 * math.pi
        for _ in range(2 + int(next(u) * 5)):
            angle += (next(u) - 0.5) * (2 * math.pi / 3)
            length = (0.1 + 0.2 * next(u)) * size
            ny = min(max(y + length * math.sin(angle), 0.0), height - 1.0)
            nx = min(max(x + length * math.cos(angle), 0.0), width - 1.0)
            a.append((y, x))
            b.append((ny, nx))
            radius.append(r)
            y, x = ny, nx
    return torch.tensor(a), torch.tensor(b), torch.tensor(radius)


def _boxes_mask(height: int, width: int, u) -> torch.Tensor:
    """1–3 axis-aligned boxes with sides 10–35 % of the image's, as an (H, W) bool mask."""
    out = torch.zeros(height, width, dtype=torch.bool)
    for _ in range(1 + int(next(u) * 3)):
        bh = max(1, round((0.1 + 0.25 * next(u)) * height))
        bw = max(1, round((0.1 + 0.25 * next(u)) * width))
        y0, x0 = int(next(u) * (height - bh + 1)), int(next(u) * (width - bw + 1))
        out[y0 : y0 + bh, x0 : x0 + bw] = True
    return out


def random_mask(height: int, width: int, *, generator: torch.Generator) -> torch.Tensor:
    """A free-form inpainting mask: brush strokes plus boxes, (1, H, W) float32, 1 = hole.

    All randomness comes from one draw of ``generator``, so a seeded generator gives one mask.
    At least one pixel is a hole and at least one is known.
    """
    if height < 1 or width < 1 or height * width < 2:
        raise ValueError(f"random_mask: size {height}×{width} (H×W); expected at least two pixels")
    u = iter(torch.rand(_MASK_UNIFORMS, generator=generator, dtype=torch.float64).tolist())
    mask = _segments_mask(*_stroke_segments(height, width, u), height, width) | _boxes_mask(height, width, u)
    if mask.all() or not mask.any():  # rare, only on tiny images: flip one pixel
        mask[int(next(u) * height), int(next(u) * width)] ^= True
    return mask.float().unsqueeze(0)


# ----------------------------------------------------------------------------------------------
# training datasets


def _item_generator(*numbers: int) -> torch.Generator:
    """A generator seeded by a 64-bit hash of the numbers (distinct tuples, unrelated streams).

    The numbers go through ``int`` first, so a numpy or 0-d tensor index gives the same stream.
    """
    digest = hashlib.blake2b(repr(tuple(int(n) for n in numbers)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def _dihedral(img: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/rotations of a square (C, S, S) image: rotate by k·90°, mirror if k ≥ 4."""
    img = torch.rot90(img, k % 4, dims=(1, 2))
    return img.flip(-1) if k >= 4 else img


class _Patches(torch.utils.data.Dataset):
    """Random square crops of photos, an item a function of (seed, epoch, index) alone."""

    def __init__(self, photos, *, crop: int, samples_per_epoch: int, seed: int, augment: bool, what: str):
        photos = list(photos)
        if not photos:
            raise InputError(f"{what}: no photos given; expected at least one")
        _check_whole(samples_per_epoch, what, "samples_per_epoch")
        _check_whole(seed, what, "seed", minimum=0)
        for name, img in photos:
            if img.dim() != 3 or img.shape[0] != 3:
                raise InputError(f"{what}: photo {name} is {tuple(img.shape)}; expected (3, H, W)")
            if min(img.shape[-2:]) < crop:
                raise InputError(
                    f"{what}: photo {name} is {img.shape[-1]}×{img.shape[-2]} (W×H), smaller than the "
                    f"{crop}×{crop} crop; use larger photos or a smaller patch"
                )
        self.photos = photos
        self.crop = crop
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.augment = augment
        self.epoch = 0
        self._areas = torch.tensor([float(img.shape[-2] * img.shape[-1]) for _, img in self.photos])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose items ``__getitem__`` returns; call it before iterating each epoch.

        DataLoader workers hold a copy of the dataset: with ``persistent_workers=True`` they would
        not see the new epoch, so use non-persistent workers (the default), which copy it anew.
        """
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _crop(self, i: int) -> tuple[torch.Tensor, torch.Generator]:
        """The item's augmented crop (3, crop, crop) and its generator, for further draws."""
        if not 0 <= i < self.samples_per_epoch:
            raise IndexError(f"index {i} out of range for {self.samples_per_epoch} samples per epoch")
        g = _item_generator(self.seed, self.epoch, i)
        img = self.photos[int(torch.multinomial(self._areas, 1, generator=g))][1]
        h, w = img.shape[-2:]
        y0 = int(torch.randint(h - self.crop + 1, (), generator=g))
        x0 = int(torch.randint(w - self.crop + 1, (), generator=g))
        patch = img[:, y0 : y0 + self.crop, x0 : x0 + self.crop]
        if self.augment:
            patch = _dihedral(patch, int(torch.randint(8, (), generator=g)))
        return patch.clone(memory_format=torch.contiguous_format), g

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self.photos)} photos, crop={self.crop}, "
            f"samples_per_epoch={self.samples_per_epoch}, seed={self.seed}, augment={self.augment}, epoch={self.epoch})"
        )


class SRPatches(_Patches):
    """Super-resolution training pairs: random HR crops of the photos and their bicubic LR.

    Items are ``(lr (3, p, p), hr (3, p·s, p·s))`` float32 in [0, 1] with p = ``patch`` and
    s = ``scale``. A photo is picked with probability proportional to its area, then a random HR
    crop, then (if ``augment``) one of the 8 dihedral transforms, then lr = bicubic_down(hr).
    """

    def __init__(self, photos, *, scale: int, patch: int, samples_per_epoch: int, seed: int = 0, augment: bool = True):
        _check_whole(scale, "SRPatches", "scale")
        _check_whole(patch, "SRPatches", "patch")
        super().__init__(
            photos,
            crop=patch * scale,
            samples_per_epoch=samples_per_epoch,
            seed=seed,
            augment=augment,
            what="SRPatches",
        )
        self.scale = scale
        self.patch = patch

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        hr, _ = self._crop(i)
        return bicubic_down(hr, self.scale), hr


class InpaintPatches(_Patches):
    """Inpainting training triples: random crops of the photos with a random free-form mask.

    Items are ``(inp (4, p, p), mask (1, p, p), image (3, p, p))``: inp = inpaint_input(image, mask)
    (image scaled to [-1, 1], zero in the hole, mask appended), image in [0, 1], mask 1 = hole.
    ``patch`` must be a multiple of 4 (the network has two stride-2 stages).
    """

    def __init__(self, photos, *, patch: int, samples_per_epoch: int, seed: int = 0, augment: bool = True):
        _check_whole(patch, "InpaintPatches", "patch")
        if patch % 4:
            raise InputError(f"InpaintPatches: patch is {patch}; expected a multiple of 4 (two stride-2 stages)")
        super().__init__(
            photos,
            crop=patch,
            samples_per_epoch=samples_per_epoch,
            seed=seed,
            augment=augment,
            what="InpaintPatches",
        )
        self.patch = patch

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, g = self._crop(i)
        mask = random_mask(self.patch, self.patch, generator=g)
        return inpaint_input(image[None], mask[None])[0], mask, image


# ----------------------------------------------------------------------------------------------
# validation sets


def _centre_crop(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(C, H, W) -> (C, height, width) from the middle (the extra pixel of an odd margin at the bottom/right)."""
    top, left = (img.shape[-2] - height) // 2, (img.shape[-1] - width) // 2
    return img[..., top : top + height, left : left + width]


def val_sr_pairs(photos, scale: int, max_size: int | None = None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Deterministic SR validation pairs ``(name, lr (1, 3, h, w), hr (1, 3, h·s, w·s))``, one per photo.

    Each photo is centre-cropped to at most ``max_size`` × ``max_size`` (if given), then cropped at
    the bottom/right to multiples of ``scale`` and downsampled with ``bicubic_down``.
    """
    _check_whole(scale, "val_sr_pairs", "scale")
    if max_size is not None:
        _check_whole(max_size, "val_sr_pairs", "max_size", minimum=scale)
    pairs = []
    for name, img in photos:
        h, w = img.shape[-2:]
        if max_size is not None:
            img = _centre_crop(img, min(h, max_size), min(w, max_size))
        if min(img.shape[-2:]) < scale:
            raise InputError(f"val_sr_pairs: photo {name} is {w}×{h} (W×H); expected at least {scale}×{scale}")
        lr, hr = sr_pair(img, scale)
        pairs.append((name, lr.unsqueeze(0), hr.unsqueeze(0).contiguous()))
    return pairs


def val_inpaint_cases(photos, size: int, seed: int = 0) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Fixed inpainting validation cases ``(name, image (1, 3, size, size), mask (1, 1, size, size))``.

    The image is the photo's centre crop; the mask is ``random_mask`` with a generator seeded by
    (``seed``, photo index), so the same photos give the same masks in every run.
    """
    _check_whole(size, "val_inpaint_cases", "size", minimum=2)  # a mask needs a hole and a known pixel
    cases = []
    for index, (name, img) in enumerate(photos):
        if min(img.shape[-2:]) < size:
            raise InputError(
                f"val_inpaint_cases: photo {name} is {img.shape[-1]}×{img.shape[-2]} (W×H), smaller than "
                f"the {size}×{size} validation crop"
            )
        mask = random_mask(size, size, generator=_item_generator(seed, index))
        cases.append((name, _centre_crop(img, size, size).unsqueeze(0).contiguous(), mask.unsqueeze(0)))
    return cases


# ----------------------------------------------------------------------------------------------
# the inpainting network's input and output


def inpaint_input(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inpainting network's input [image·(1−mask), mask] with the image scaled to [-1, 1].

    image: (B, 3, H, W) in [0, 1]; mask: (B, 1, H, W), 1 = hole -> (B, 4, H, W).
    """
    return torch.cat([(image * 2 - 1) * (1 - mask), mask], dim=1)


def inpaint_blend(pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep the known pixels and take the network's prediction in the hole.

    pred: (B, 3, H, W) network output in [-1, 1]; image: (B, 3, H, W) in [0, 1]; mask: (B, 1, H, W)
    -> (B, 3, H, W) in [0, 1], ``mask·pred + (1−mask)·image``.
    """
    pred01 = (pred.clamp(-1, 1) + 1) / 2
    return mask * pred01 + (1 - mask) * image
