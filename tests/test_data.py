"""Training and validation data: photos, splits, bicubic pairs, patch datasets, inpainting masks."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from attnsr import data
from attnsr.data import (
    BUILTIN_PHOTOS,
    DEFAULT_VAL,
    InpaintPatches,
    SRPatches,
    bicubic_down,
    bicubic_up,
    inpaint_input,
    load_photos,
    random_mask,
    split_photos,
    sr_pair,
    val_inpaint_cases,
    val_sr_pairs,
)
from attnsr.images import InputError


@pytest.fixture(scope="module")
def builtin():
    return load_photos()


def _photo(name, h, w, seed=0):
    return name, torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def _names(photos):
    return [name for name, _ in photos]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- photos


def test_builtin_photos(builtin):
    import skimage.data

    assert _names(builtin) == list(BUILTIN_PHOTOS)
    assert len(builtin) == 8 and "cat" not in BUILTIN_PHOTOS and DEFAULT_VAL in BUILTIN_PHOTOS
    for name, img in builtin:
        assert img.dtype == torch.float32 and img.dim() == 3 and img.shape[0] == 3, (name, img.shape)
        assert min(img.shape[-2:]) >= 300, (name, img.shape)
        assert img.min() >= 0 and img.max() <= 1 and img.max() > 0.5, (name, img.min(), img.max())
    chelsea = dict(builtin)["chelsea"]
    assert chelsea.shape == (3, 300, 451)
    expected = torch.from_numpy(skimage.data.chelsea().astype(np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(chelsea, expected, rtol=0, atol=1e-7)
    assert torch.equal(dict(load_photos("builtin"))["chelsea"], chelsea)


def test_folder_photos_recursive_sorted_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (8, 9), dtype=np.uint8)
    rgba = rng.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(rgb).save(tmp_path / "b.png")
    Image.fromarray(rgb).save(tmp_path / "sub" / "a.JPG", format="JPEG", quality=95)
    Image.fromarray(grey).save(tmp_path / "sub" / "deeper" / "grey.png")
    Image.fromarray(rgba).save(tmp_path / "A_rgba.PNG")
    Image.fromarray(rgb).save(tmp_path / "c.jpeg", format="JPEG")
    (tmp_path / "notes.txt").write_text("not an image")

    photos = load_photos(str(tmp_path))
    assert _names(photos) == ["A_rgba.PNG", "b.png", "c.jpeg", "sub/a.JPG", "sub/deeper/grey.png"]
    assert _names(load_photos(tmp_path)) == _names(photos)  # a pathlib.Path works too
    by_name = dict(photos)
    for name, img in photos:
        assert img.dtype == torch.float32 and img.shape[0] == 3, (name, img.shape)
        assert img.min() >= 0 and img.max() <= 1
    assert torch.equal(by_name["b.png"], torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    g = by_name["sub/deeper/grey.png"]
    assert g.shape == (3, 8, 9) and torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    assert torch.equal(g[0], torch.from_numpy(grey).float() / 255)
    assert by_name["A_rgba.PNG"].shape == (3, 6, 7)
    assert by_name["sub/a.JPG"].shape == (3, 10, 12)


def test_folder_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_photos(str(tmp_path / "missing"))
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(InputError, match="is not a folder"):
        load_photos(str(tmp_path / "file.png"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="holds no images"):
        load_photos(str(empty))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(corrupt / "good.png")
    (corrupt / "broken.jpg").write_bytes(b"this is not a JPEG")
    with pytest.raises(InputError, match=r"broken\.jpg"):
        load_photos(str(corrupt))


# ---------------------------------------------------------------------------------------------- split

_SPLIT_NAMES = ["rocket", "astronaut", "chelsea", "coffee", "retina"]


@pytest.fixture
def small_photos():
    return [(name, torch.zeros(3, 4, 4)) for name in _SPLIT_NAMES]


def test_split_by_name(small_photos):
    train, val = split_photos(small_photos)
    assert _names(val) == ["chelsea"] and _names(train) == ["rocket", "astronaut", "coffee", "retina"]
    train, val = split_photos(small_photos, "retina, astronaut")
    assert _names(val) == ["astronaut", "retina"] and _names(train) == ["rocket", "chelsea", "coffee"]
    assert val[0][1] is small_photos[1][1]  # the tensors themselves, not copies


def test_split_by_count(small_photos):
    train, val = split_photos(small_photos, 2)  # by name: astronaut chelsea coffee retina rocket
    assert _names(val) == ["rocket", "retina"] and _names(train) == ["astronaut", "chelsea", "coffee"]
    assert split_photos(small_photos, "2") == (train, val)


def test_split_errors(small_photos):
    with pytest.raises(InputError, match=r"nope not found; the available photos are rocket, astronaut, chelsea"):
        split_photos(small_photos, "chelsea,nope")
    with pytest.raises(InputError, match="no training photo"):
        split_photos(small_photos, ",".join(_SPLIT_NAMES))
    for count in (0, 5, 7):
        with pytest.raises(InputError, match="both splits keep a photo"):
            split_photos(small_photos, count)
    with pytest.raises(InputError, match="names no photo"):
        split_photos(small_photos, " , ")
    with pytest.raises(InputError, match="photo names chelsea repeat"):
        split_photos([*small_photos, small_photos[2]], 1)


# ---------------------------------------------------------------------------------------------- bicubic pairs


def test_bicubic_down_is_antialiased_interpolate():
    hr = torch.rand(2, 3, 24, 36)
    lr = bicubic_down(hr, 3)
    ref = F.interpolate(hr, scale_factor=1 / 3, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    assert lr.shape == (2, 3, 8, 12) and torch.equal(lr, ref)
    assert torch.equal(bicubic_down(hr[0], 3), lr[0])
    checker = (torch.arange(48)[:, None] // 2 + torch.arange(48)[None, :] // 2) % 2
    sharp = checker.float().expand(3, 48, 48)  # bicubic overshoots on a checkerboard: clamped
    assert bicubic_down(sharp, 2).min() >= 0 and bicubic_down(sharp, 2).max() <= 1


def test_bicubic_down_rejects_non_multiples():
    with pytest.raises(ValueError, match=r"25×36 \(H×W\); expected H and W multiples of the scale 3"):
        bicubic_down(torch.rand(3, 25, 36), 3)
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\) or \(3, H, W\)"):
        bicubic_down(torch.rand(1, 24, 36), 3)
    with pytest.raises(ValueError, match="scale is 0; expected a whole number ≥ 1"):
        bicubic_down(torch.rand(3, 24, 36), 0)


def test_bicubic_up():
    lr = torch.rand(1, 3, 5, 7)
    ref = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    assert torch.equal(bicubic_up(lr, 4), ref) and ref.shape == (1, 3, 20, 28)
    assert torch.equal(bicubic_up(lr[0], 4), ref[0])


def test_sr_pair_crops_bottom_right():
    hr = torch.rand(3, 50, 47)
    lr, cropped = sr_pair(hr, 4)
    assert cropped.shape == (3, 48, 44) and torch.equal(cropped, hr[:, :48, :44])
    assert lr.shape == (3, 12, 11) and torch.equal(lr, bicubic_down(cropped, 4))
    lr_b, cropped_b = sr_pair(hr[None], 4)
    assert torch.equal(lr_b[0], lr) and torch.equal(cropped_b[0], cropped)


# ---------------------------------------------------------------------------------------------- SRPatches


def _all_dihedral(img):
    return [data._dihedral(img, k) for k in range(8)]


def test_dihedral_gives_eight_distinct_transforms():
    img = torch.arange(9.0).view(1, 3, 3)
    views = {tuple(t.flatten().tolist()) for t in _all_dihedral(img)}
    assert len(views) == 8


def test_sr_patches_shapes_and_values():
    photos = [_photo("a", 40, 50, 1), _photo("b", 64, 33, 2)]
    ds = SRPatches(photos, scale=3, patch=8, samples_per_epoch=20, seed=5)
    assert len(ds) == 20
    for i in range(len(ds)):
        lr, hr = ds[i]
        assert lr.shape == (3, 8, 8) and hr.shape == (3, 24, 24)
        assert lr.dtype == hr.dtype == torch.float32 and hr.is_contiguous()
        assert lr.min() >= 0 and lr.max() <= 1 and hr.min() >= 0 and hr.max() <= 1
        assert torch.equal(lr, bicubic_down(hr, 3)), f"item {i}: lr is not bicubic_down of the augmented hr"


def _is_crop(img, patch):
    """Whether patch (3, S, S) equals some S×S window of img (3, H, W)."""
    size = patch.shape[-1]
    windows = img.unfold(1, size, 1).unfold(2, size, 1)  # (3, H-S+1, W-S+1, S, S)
    return bool((windows == patch[:, None, None]).flatten(3).all(-1).all(0).any())


def test_sr_patches_are_augmented_crops():
    photos = [_photo("a", 20, 20, 3)]
    plain = SRPatches(photos, scale=2, patch=4, samples_per_epoch=16, augment=False)
    augmented = SRPatches(photos, scale=2, patch=4, samples_per_epoch=64)
    img = photos[0][1]
    for i in range(len(plain)):
        assert _is_crop(img, plain[i][1]), f"item {i} is not a crop of the photo"
    transforms = set()
    for i in range(len(augmented)):
        found = [k for k, t in enumerate(_all_dihedral(augmented[i][1])) if _is_crop(img, t)]
        assert found, f"item {i} is no dihedral transform of a crop"
        transforms.add(found[0])
    assert len(transforms) == 8, f"augmentation used only the transforms {sorted(transforms)}"


def test_sr_patches_deterministic_per_seed_epoch_index():
    photos = [_photo("a", 40, 50, 1), _photo("b", 64, 33, 2)]
    a = SRPatches(photos, scale=2, patch=8, samples_per_epoch=10, seed=7)
    b = SRPatches(photos, scale=2, patch=8, samples_per_epoch=10, seed=7)
    backwards = [b[i] for i in reversed(range(10))][::-1]  # another object, another order of calls
    for i in range(10):
        assert all(torch.equal(x, y) for x, y in zip(a[i], backwards[i])), f"item {i} differs"
        assert all(torch.equal(x, y) for x, y in zip(a[i], a[i]))
    first = [a[i][1] for i in range(10)]
    a.set_epoch(1)
    assert not any(torch.equal(first[i], a[i][1]) for i in range(10))
    a.set_epoch(0)
    assert all(torch.equal(first[i], a[i][1]) for i in range(10))
    c = SRPatches(photos, scale=2, patch=8, samples_per_epoch=10, seed=8)
    assert not any(torch.equal(first[i], c[i][1]) for i in range(10))


def test_sr_patches_same_through_dataloader_workers():
    photos = [_photo("a", 40, 50, 1)]
    ds = SRPatches(photos, scale=2, patch=6, samples_per_epoch=8, seed=3)
    ds.set_epoch(2)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    lr, hr = (torch.cat(parts) for parts in zip(*loader))
    assert torch.equal(hr, torch.stack([ds[i][1] for i in range(8)]))
    assert torch.equal(lr, torch.stack([ds[i][0] for i in range(8)]))


def test_sr_patches_pick_photos_by_area():
    photos = [("small", torch.full((3, 16, 16), 0.25)), ("large", torch.full((3, 16, 48), 0.75))]
    ds = SRPatches(photos, scale=2, patch=4, samples_per_epoch=400)
    large = sum(float(ds[i][1][0, 0, 0]) == 0.75 for i in range(len(ds))) / len(ds)
    # area share 3/4; binomial sd over 400 draws ≈ 0.022, so ±0.08 is > 3.5 sd
    assert abs(large - 0.75) < 0.08, f"large photo drawn {large:.3f} of the time, expected 0.75"


def test_sr_patches_errors():
    with pytest.raises(InputError, match=r"photo tiny is 30×20 \(W×H\), smaller than the 32×32 crop"):
        SRPatches([_photo("ok", 40, 40), _photo("tiny", 20, 30)], scale=4, patch=8, samples_per_epoch=1)
    for kwargs, message in [
        (dict(scale=2.0, patch=8), "scale is 2.0; expected a whole number ≥ 1"),
        (dict(scale=2, patch=0), "patch is 0; expected a whole number ≥ 1"),
        (dict(scale=2, patch=8, samples_per_epoch=0), "samples_per_epoch is 0; expected a whole number ≥ 1"),
    ]:
        with pytest.raises(InputError, match=message):
            SRPatches([_photo("ok", 40, 40)], **{"samples_per_epoch": 1, **kwargs})
    with pytest.raises(InputError, match="no photos given"):
        SRPatches([], scale=2, patch=8, samples_per_epoch=1)
    ds = SRPatches([_photo("ok", 40, 40)], scale=4, patch=8, samples_per_epoch=3)
    with pytest.raises(IndexError, match="index 3 out of range for 3 samples"):
        ds[3]


def test_sr_patches_index_type_and_repr():
    ds = SRPatches([_photo("ok", 40, 40)], scale=2, patch=8, samples_per_epoch=3, seed=2)
    hr = ds[1][1]
    assert torch.equal(ds[np.int64(1)][1], hr) and torch.equal(ds[torch.tensor(1)][1], hr)
    assert repr(ds) == "SRPatches(1 photos, crop=16, samples_per_epoch=3, seed=2, augment=True, epoch=0)"


# ---------------------------------------------------------------------------------------------- masks


def _rectangle_corners(mask):
    """2×2 windows holding 1 or 3 hole pixels: one per corner of the hole region's outline."""
    m = mask[0]
    s = m[:-1, :-1] + m[1:, :-1] + m[:-1, 1:] + m[1:, 1:]
    return int(((s == 1) | (s == 3)).sum())


# The outline of a union of k ≤ 3 axis-aligned rectangles has at most 4k rectangle corners plus
# 8 crossings per pair of rectangles: 12 + 8·3 = 36 corners. Strokes at any angle other than
# 0°/90° and their round caps make staircases with many more.
_MAX_BOX_CORNERS = 36


@pytest.mark.parametrize("height, width", [(64, 64), (96, 160)])
def test_random_mask_statistics(height, width):
    masks = torch.stack([random_mask(height, width, generator=_gen(1000 + i)) for i in range(200)])
    assert masks.shape == (200, 1, height, width) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    fractions = masks.flatten(1).mean(1)
    assert (fractions > 0).all() and (fractions < 1).all(), "a mask without holes or without known pixels"
    # strokes cover ≈ 17 % and boxes ≈ 10 % on average, so the mean is designed to be ≈ 25 %;
    # 15–35 % leaves room for the choice of seeds while catching a doubled or halved mask
    mean = float(fractions.mean())
    assert 0.15 < mean < 0.35, f"mean hole fraction {mean:.3f}"
    typical = float(((fractions >= 0.1) & (fractions <= 0.5)).float().mean())
    assert typical >= 0.9, f"only {typical:.0%} of masks have 10-50 % holes"
    assert float(fractions.max()) < 0.75
    corners = torch.tensor([_rectangle_corners(m) for m in masks])
    stroked = float((corners > _MAX_BOX_CORNERS).float().mean())
    assert stroked >= 0.9, f"only {stroked:.0%} of masks have more corners than three boxes can make"


def test_random_mask_deterministic_and_tiny():
    a = random_mask(32, 48, generator=_gen(4))
    assert torch.equal(a, random_mask(32, 48, generator=_gen(4)))
    assert not torch.equal(a, random_mask(32, 48, generator=_gen(5)))
    for height, width in [(1, 2), (2, 2), (3, 5), (4, 4)]:
        for seed in range(30):
            m = random_mask(height, width, generator=_gen(seed))
            assert m.shape == (1, height, width) and 0 < m.sum() < height * width, (height, width, seed)
    with pytest.raises(ValueError, match="at least two pixels"):
        random_mask(1, 1, generator=_gen(0))


def test_segments_mask_matches_point_to_segment_distance():
    a = torch.tensor([[10.0, 5.0], [2.0, 34.0]])
    b = torch.tensor([[10.0, 20.0], [21.0, 26.3]])
    radius = torch.tensor([3.0, 2.2])
    got = data._segments_mask(a, b, radius, 24, 36)

    def dist(py, px, ay, ax, by, bx):
        dy, dx = by - ay, bx - ax
        t = min(max(((py - ay) * dy + (px - ax) * dx) / (dy * dy + dx * dx), 0.0), 1.0)
        return math.hypot(py - ay - t * dy, px - ax - t * dx)

    expected = torch.tensor(
        [
            [any(dist(y, x, *a[n].tolist(), *b[n].tolist()) <= radius[n] for n in range(2)) for x in range(36)]
            for y in range(24)
        ]
    )
    assert torch.equal(got, expected), f"{int((got != expected).sum())} pixels differ"
    assert got[10, 2] and got[10, 23] and not got[10, 1] and not got[10, 24]  # round caps of radius 3
    assert got[7, 12] and not got[6, 12]  # the horizontal stroke is 7 px thick


def test_segments_mask_chunks_many_segments():
    n = 300  # 300 × 128 × 128 > 4 M elements: drawn in several chunks
    g = _gen(0)
    a, b = torch.rand(n, 2, generator=g) * 127, torch.rand(n, 2, generator=g) * 127
    radius = torch.rand(n, generator=g) * 2
    whole = data._segments_mask(a, b, radius, 128, 128)
    parts = data._segments_mask(a[:150], b[:150], radius[:150], 128, 128) | data._segments_mask(
        a[150:], b[150:], radius[150:], 128, 128
    )
    assert torch.equal(whole, parts)


# ---------------------------------------------------------------------------------------------- InpaintPatches


def test_inpaint_patches():
    photos = [_photo("a", 40, 50, 1), _photo("b", 70, 36, 2)]
    ds = InpaintPatches(photos, patch=32, samples_per_epoch=12, seed=1)
    assert len(ds) == 12
    for i in range(len(ds)):
        inp, mask, image = ds[i]
        assert inp.shape == (4, 32, 32) and mask.shape == (1, 32, 32) and image.shape == (3, 32, 32)
        assert inp.dtype == mask.dtype == image.dtype == torch.float32
        assert image.min() >= 0 and image.max() <= 1
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(inp, inpaint_input(image[None], mask[None])[0])
    again = InpaintPatches(photos, patch=32, samples_per_epoch=12, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(ds[5], again[5]))
    again.set_epoch(1)
    assert not torch.equal(ds[5][1], again[5][1])


def test_inpaint_patches_errors():
    with pytest.raises(InputError, match="patch is 30; expected a multiple of 4"):
        InpaintPatches([_photo("a", 40, 40)], patch=30, samples_per_epoch=1)
    with pytest.raises(InputError, match=r"photo a is 40×40 \(W×H\), smaller than the 48×48 crop"):
        InpaintPatches([_photo("a", 40, 40)], patch=48, samples_per_epoch=1)


# ---------------------------------------------------------------------------------------------- validation


def test_val_sr_pairs(builtin):
    _, val = split_photos(builtin)
    ((name, lr, hr),) = val_sr_pairs(val, 4)
    assert name == "chelsea" and lr.shape == (1, 3, 75, 112) and hr.shape == (1, 3, 300, 448)
    assert torch.equal(hr[0], val[0][1][:, :, :448]) and torch.equal(lr, bicubic_down(hr, 4))
    ((_, lr, hr),) = val_sr_pairs(val, 3, max_size=100)
    assert lr.shape == (1, 3, 33, 33) and hr.shape == (1, 3, 99, 99)
    assert torch.equal(hr[0], val[0][1][:, 100:199, 175:274])  # centre 100×100 crop, then bottom/right to 99
    again = val_sr_pairs(val, 3, max_size=100)
    assert torch.equal(again[0][1], lr) and torch.equal(again[0][2], hr)
    with pytest.raises(InputError, match="max_size is 2; expected a whole number ≥ 3"):
        val_sr_pairs(val, 3, max_size=2)


def test_val_inpaint_cases():
    photos = [_photo("a", 40, 50, 1), _photo("b", 36, 70, 2)]
    cases = val_inpaint_cases(photos, 32, seed=3)
    assert [name for name, _, _ in cases] == ["a", "b"]
    for _, image, mask in cases:
        assert image.shape == (1, 3, 32, 32) and mask.shape == (1, 1, 32, 32)
        assert 0 < mask.sum() < 32 * 32
    assert torch.equal(cases[0][1][0], photos[0][1][:, 4:36, 9:41])
    again = val_inpaint_cases(photos, 32, seed=3)
    assert all(torch.equal(x[2], y[2]) and torch.equal(x[1], y[1]) for x, y in zip(cases, again))
    assert not torch.equal(cases[0][2], cases[1][2])
    assert not torch.equal(cases[0][2], val_inpaint_cases(photos, 32, seed=4)[0][2])
    with pytest.raises(InputError, match="smaller than the 40×40 validation crop"):
        val_inpaint_cases(photos, 40)
