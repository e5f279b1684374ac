"""attnsr: fused attention layers for image-restoration networks.

Layers take ``backend=`` ("naive", "torch", "triton", "auto"); the fused Triton kernels live in the
top-level ``kernels`` package.
"""

from attnsr import models
from attnsr.layers import SelfAttention2d

__all__ = ["SelfAttention2d", "models"]
