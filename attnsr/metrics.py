"""Image-quality metrics with the super-resolution conventions: PSNR and SSIM on the Y channel.

Images are (B, 3, H, W) or (B, 1, H, W) tensors with values in [0, 1]. For RGB input the metrics
use the BT.601 luma of the "YCbCr" convention used in SR papers (Y in [16/255, 235/255]),
and ``crop`` pixels are dropped at every border first (the SR convention crops ``scale``). All
computation is float64; each function returns one value per image, shape (B,).

SSIM is Wang et al. (2004): 11×11 Gaussian window with σ = 1.5, K1 = 0.01, K2 = 0.03, data range
1, averaged over the valid (unpadded) window positions.
"""

import torch
import torch.nn.functional as F

_BT601 = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) luma Y in [16/255, 235/255]."""
    r, g, b = img[:, 0:1], img[:, 1:2], img[:, 2:3]
    return 16.0 / 255.0 + _BT601[0] * r + _BT601[1] * g + _BT601[2] * b


def _prepare(a: torch.Tensor, b: torch.Tensor, crop: int, y_channel: bool, what: str):
    if a.shape != b.shape:
        raise ValueError(f"{what}: images are {tuple(a.shape)} and {tuple(b.shape)}; expected the same shape")
    if a.dim() != 4 or a.shape[1] not in (1, 3):
        raise ValueError(f"{what}: images are {tuple(a.shape)}; expected (B, 3, H, W) or (B, 1, H, W)")
    a, b = a.double(), b.double()
    if y_channel and a.shape[1] == 3:
        a, b = rgb_to_y(a), rgb_to_y(b)
    if crop:
        if 2 * crop >= min(a.shape[-2:]):
            raise ValueError(f"{what}: crop {crop} leaves nothing of a {a.shape[-2]}×{a.shape[-1]} image")
        a, b = a[..., crop:-crop, crop:-crop], b[..., crop:-crop, crop:-crop]
    return a, b


def psnr(a: torch.Tensor, b: torch.Tensor, *, crop: int = 0, y_channel: bool = True, mask=None) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, data range 1; inf for identical images.

    ``mask`` (B, 1, H, W) with 1 where to measure (e.g. an inpainting hole) restricts the mean
    squared error to those pixels (after the same crop).
    """
    a, b = _prepare(a, b, crop, y_channel, "psnr")
    sq = (a - b) ** 2
    if mask is None:
        mse = sq.flatten(1).mean(1)
    else:
        m = mask.double()
        if crop:
            m = m[..., crop:-crop, crop:-crop]
        m = m.expand_as(sq)
        mse = (sq * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor, *, crop: int = 0, y_channel: bool = True) -> torch.Tensor:
    """Structural similarity per image (mean over channels and valid window positions)."""
    a, b = _prepare(a, b, crop, y_channel, "ssim")
    if min(a.shape[-2:]) < 11:
        raise ValueError(f"ssim: images of {a.shape[-2]}×{a.shape[-1]} are smaller than the 11×11 window")
    c1, c2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2
    channels = a.shape[1]
    w = _gaussian_window().to(a.device).expand(channels, 1, 11, 11)

    def filt(t):
        return F.conv2d(t, w, groups=channels)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)

