"""attnsr: fused attention layers for image-restoration networks.

Layers take ``backend=`` ("naive", "torch", "triton", "auto"); the fused Triton kernels live in the
``attnsr.kernels`` package. On a machine without CUDA, set ``TRITON_INTERPRET=1`` before the
first import to run the triton backend in Triton's (slow) CPU interpreter.
"""

from attnsr import models
from attnsr.layers import (
    CBAM,
    AdaptiveTransposedAttention,
    ChannelAttention,
    LayerAttention,
    SelfAttention2d,
    SpatialAttention,
    TransposedAttention,
)
from attnsr.swap import swap_attention
from attnsr.windows import (
    AdaptiveRectWindowAttention,
    HybridAttentionBlock,
    RectWindowAttention,
    RectWindowBlock,
    SwinBlock,
    SwinV2Block,
    WindowAttention,
    WindowAttentionMap,
    WindowAttentionQKV,
    WindowAttentionRPI,
    WindowAttentionToQKV,
    WindowAttentionV2,
    WindowAttentionV2Map,
)

__all__ = [
    "CBAM",
    "AdaptiveRectWindowAttention",
    "AdaptiveTransposedAttention",
    "ChannelAttention",
    "HybridAttentionBlock",
    "LayerAttention",
    "RectWindowAttention",
    "RectWindowBlock",
    "SelfAttention2d",
    "SpatialAttention",
    "SwinBlock",
    "SwinV2Block",
    "TransposedAttention",
    "WindowAttention",
    "WindowAttentionMap",
    "WindowAttentionQKV",
    "WindowAttentionRPI",
    "WindowAttentionToQKV",
    "WindowAttentionV2",
    "WindowAttentionV2Map",
    "models",
    "swap_attention",
]
