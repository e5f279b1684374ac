"""attnsr's Triton kernels: the public functional API.

Every op is Triton kernels (forward, backward) registered as ``torch.library`` custom ops with
fake kernels and an autograd formula, so they work under autograd, autocast and torch.compile.
On CPU tensors the kernels need ``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from .attention import flash_attention, image_attention, image_attention_qkv
from .cbam import cbam_gate
from .channel_gate import channel_gate
from .layer_fusion import layer_fusion
from .transposed_attention import transposed_attention, transposed_attention_qkv
from .spatial_gate import spatial_gate
from .window_attention import window_attention, window_attention_qkv

__all__ = [
    "cbam_gate",
    "channel_gate",
    "flash_attention",
    "image_attention",
    "image_attention_qkv",
    "layer_fusion",
    "spatial_gate",
    "transposed_attention",
    "transposed_attention_qkv",
    "window_attention",
    "window_attention_qkv",
]
