"""attnsr's Triton kernels: the public functional API.

Every op is a Triton kernel pair (forward, backward) wrapped in a ``torch.autograd.Function``.
On CPU tensors the kernels need ``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from kernels.attention import flash_attention, image_attention

__all__ = ["flash_attention", "image_attention"]
