"""The inpainting document's network: a conv encoder-decoder with self-attention at three scales."""

from torch import nn

from attnsr.layers import SelfAttention2d


class ImageInpaintingModel(nn.Module):
    """Encoder-decoder with a :class:`~attnsr.layers.SelfAttention2d` after every conv stage.

    Encoder: conv 3×3 → 64, ReLU, attention; stride-2 conv → 128, ReLU, attention; stride-2 conv →
    256, ReLU, attention. Decoder: transposed conv → 128, ReLU, attention; transposed conv → 64, ReLU,
    attention; conv 3×3 → out_channels, Tanh (outputs in [-1, 1]: images are scaled to that range).

    ``in_channels=4`` takes the masked image with its mask as a fourth channel (1 = missing), which
    is how the CLI trains it; the document's default is 3. The attention at full resolution is
    quadratic in H·W: that is the cost the fused kernels exist for.

    x: (B, in_channels, H, W) with H and W divisible by 4 -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels=3, out_channels=3, *, heads=1, backend="auto"):
        super().__init__()
        attn = dict(heads=heads, backend=backend)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1), nn.ReLU(), SelfAttention2d(64, **attn),
            nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU(), SelfAttention2d(128, **attn),
            nn.Conv2d(128, 256, 3, 2, 1), nn.ReLU(), SelfAttention2d(256, **attn),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 3, 2, 1, 1), nn.ReLU(), SelfAttention2d(128, **attn),
            nn.ConvTranspose2d(128, 64, 3, 2, 1, 1), nn.ReLU(), SelfAttention2d(64, **attn),
            nn.Conv2d(64, out_channels, 3, 1, 1), nn.Tanh(),
        )

    def forward(self, x):
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(
                f"ImageInpaintingModel: input is {tuple(x.shape)}; H and W must be divisible by 4 "
                "(two stride-2 stages)"
            )
        return self.decoder(self.encoder(x))
