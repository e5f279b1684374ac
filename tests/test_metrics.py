"""PSNR and SSIM against values known in closed form."""

import math

import pytest
import torch

from attnsr.metrics import psnr, rgb_to_y, ssim


def test_identical_images():
    x = torch.rand(2, 3, 20, 24)
    assert torch.isinf(psnr(x, x)).all()
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))


def test_psnr_of_a_known_offset():
    """Grey images differing by d in every RGB channel differ by d·(65.481+128.553+24.966)/255 in Y."""
    d = 0.05
    a = torch.full((1, 3, 16, 16), 0.4)
    dy = d * (65.481 + 128.553 + 24.966) / 255
    assert psnr(a, a + d).item() == pytest.approx(10 * math.log10(1 / dy**2), rel=1e-6)
    assert psnr(a, a + d, y_channel=False).item() == pytest.approx(10 * math.log10(1 / d**2), rel=1e-6)


def test_psnr_of_gaussian_noise_matches_its_variance():
    torch.manual_seed(0)
    a = torch.rand(1, 1, 256, 256, dtype=torch.float64)
    sigma = 0.02
    b = a + sigma * torch.randn_like(a)
    assert psnr(a, b).item() == pytest.approx(10 * math.log10(1 / sigma**2), abs=0.05)


def test_ssim_of_constant_images():
    """Constant images: variances and covariance vanish, SSIM = (2ab + C1) / (a² + b² + C1)."""
    a, b = 0.3, 0.5
    c1 = 0.01**2
    full = (torch.full((1, 1, 16, 16), v, dtype=torch.float64) for v in (a, b))
    got = ssim(*full).item()
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)


def test_ssim_falls_with_noise_and_crop_and_mask():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 40, 40)
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert ssim(x, noisy).item() < ssim(x, (x + 0.01 * torch.randn_like(x)).clamp(0, 1)).item() < 1
    assert psnr(x, noisy, crop=4).shape == (1,)
    mask = torch.zeros(1, 1, 40, 40)
    mask[..., 10:20, 10:20] = 1
    only_hole = x.clone()
    only_hole[..., 10:20, 10:20] = noisy[..., 10:20, 10:20]
    assert torch.isinf(psnr(x, only_hole, mask=1 - mask)).all()
    assert psnr(x, only_hole, mask=mask).item() < psnr(x, only_hole).item()


def test_luma_range_and_errors():
    assert rgb_to_y(torch.zeros(1, 3, 1, 1)).item() == pytest.approx(16 / 255)
    assert rgb_to_y(torch.ones(1, 3, 1, 1)).item() == pytest.approx(235 / 255)
    with pytest.raises(ValueError, match=r"expected the same shape"):
        psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match=r"smaller than the 11×11 window"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
