"""The super-resolution document's network: channel then spatial attention before a residual trunk."""

from torch import nn

from attnsr.layers import ChannelAttention, SpatialAttention


class ResidualBlock(nn.Module):
    """conv 3×3, ReLU, conv 3×3, plus the input (no batch norm, as in the document and EDSR)."""

    def __init__(self, num_features):
        super().__init__()
        self.conv1 = nn.Conv2d(num_features, num_features, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(num_features, num_features, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(self.relu(self.conv1(x)))


class AttentionSRNet(nn.Module):
    """Feature extraction, channel attention, spatial attention, residual blocks, sub-pixel upsampler.

    As the document builds it: conv 3×3 → num_features + ReLU; channel attention (global average
    pool, 1×1 conv to num_features/16, ReLU, 1×1 conv back, sigmoid; features × gate); spatial
    attention (Conv2d(num_features, 1, 7) + sigmoid on the gated features; features × map);
    num_blocks residual blocks, conv 3×3 + ReLU, conv 3×3 → num_channels·scale², PixelShuffle(scale).
    The document fixes scale = 2; ``scale`` 3 and 4 widen the last conv to num_channels·scale² and
    shuffle by ``scale`` in one step, the same construction. Output is not clamped.

    x: (B, num_channels, H, W) -> (B, num_channels, scale·H, scale·W).
    """

    def __init__(self, num_channels=3, num_features=64, num_blocks=16, scale=2, *, backend="auto"):
        super().__init__()
        if scale not in (2, 3, 4):
            raise ValueError(f"AttentionSRNet: scale must be 2, 3 or 4, got {scale!r}")
        self.scale = scale
        self.feature_extractor = nn.Sequential(nn.Conv2d(num_channels, num_features, 3, padding=1),
                                               nn.ReLU(inplace=True))
        self.channel_attention = ChannelAttention(num_features, 16, backend=backend)
        self.spatial_attention = SpatialAttention(7, mode="conv", channels=num_features, backend=backend)
        self.reconstruction = nn.Sequential(
            *[ResidualBlock(num_features) for _ in range(num_blocks)],
            nn.Conv2d(num_features, num_features, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_features, num_channels * scale * scale, 3, padding=1),
            nn.PixelShuffle(scale),
        )

    def forward(self, x):
        features = self.feature_extractor(x)
        features = self.spatial_attention(self.channel_attention(features))
        return self.reconstruction(features)
