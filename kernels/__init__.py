"""attnsr's Triton kernels: the public functional API.

Every op is Triton kernels (forward, backward) registered as ``torch.library`` custom ops with
fake kernels and an autograd formula, so they work under autograd, autocast and torch.compile.
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
