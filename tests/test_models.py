"""The two documents' networks: forward and backward at several sizes on every backend."""

import pytest
import torch
from conftest import DEVICE
from tolerances import assert_close_rel

from attnsr.models import AttentionSRNet, ImageInpaintingModel

BACKENDS = ["naive", "torch", "triton"]


def _forward_backward(model, x, backend):
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    model.zero_grad()
    x = x.detach().requires_grad_()
    y = model(x)
    y.square().mean().backward()
    return [y, x.grad] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("scale, size", [(2, (7, 9)), (3, (5, 6)), (4, (4, 4))])
def test_sr_net_backends_agree(scale, size):
    """What differs between the backends here is the channel attention (naive: pooling modules and
    1×1 convolutions; torch: the functional reference; triton: the fused kernel); the SR net's spatial
    attention is the document's conv mode, one plain PyTorch expression on every backend."""
    model = AttentionSRNet(num_channels=3, num_features=32, num_blocks=2, scale=scale).to(DEVICE, torch.float64)
    x = torch.randn(2, 3, *size, device=DEVICE, dtype=torch.float64)
    results = {b: _forward_backward(model, x, b) for b in BACKENDS}
    assert results["naive"][0].shape == (2, 3, scale * size[0], scale * size[1])
    for backend in ("torch", "triton"):
        for i, (g, w) in enumerate(zip(results[backend], results["naive"])):
            assert_close_rel(g, w, torch.float64, f"AttentionSRNet x{scale} {backend}: tensor {i}")


@pytest.mark.parametrize("in_channels, size", [(3, (8, 8)), (4, (12, 8))])
def test_inpainting_net_backends_agree(in_channels, size):
    model = ImageInpaintingModel(in_channels=in_channels).to(DEVICE, torch.float64)
    x = torch.randn(1, in_channels, *size, device=DEVICE, dtype=torch.float64)
    results = {b: _forward_backward(model, x, b) for b in BACKENDS}
    out = results["naive"][0]
    assert out.shape == (1, 3, *size)
    assert out.abs().max() <= 1
    for backend in ("torch", "triton"):
        for i, (g, w) in enumerate(zip(results[backend], results["naive"])):
            assert_close_rel(g, w, torch.float64, f"ImageInpaintingModel {backend}: tensor {i}")


def test_networks_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"scale must be 2, 3 or 4, got 5"):
        AttentionSRNet(scale=5)
    with pytest.raises(ValueError, match=r"H and W must be divisible by 4"):
        ImageInpaintingModel(backend="torch")(torch.randn(1, 3, 6, 8))


def test_sr_net_matches_document_layout():
    """Parameter count of the document's network with its defaults (scale 2): 64 features, 16 blocks."""
    model = AttentionSRNet()
    f, c = 64, 3
    expected = (c * f * 9 + f) + (f * (f // 16) + f // 16 + (f // 16) * f + f) + (f * 49 + 1)
    expected += 16 * 2 * (f * f * 9 + f) + (f * f * 9 + f) + (f * c * 4 * 9 + c * 4)
    assert sum(p.numel() for p in model.parameters()) == expected
