"""attnsr's Triton kernels: the public functional API.

Every op is a Triton kernel pair (forward, backward) wrapped in a ``torch.autograd.Function``.
On CPU tensors the kernels need ``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from kernels.attention import flash_attention, image_attention
from kernels.cbam import cbam_gate
from kernels.channel_gate import channel_gate
from kernels.layer_fusion import layer_fusion
from kernels.spatial_gate import spatial_gate

__all__ = [
    "cbam_gate",
    "channel_gate",
    "flash_attention",
    "image_attention",
    "layer_fusion",
    "spatial_gate",
]
