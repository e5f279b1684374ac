"""Attention layers for image-restoration networks, each with four interchangeable backends.

Every backend of a layer has the same parameters and state_dict keys: a checkpoint trained with
one loads into another, and ``layer.backend = "triton"`` switches a built layer.
"""

import math

import torch
from torch import nn

from attnsr import backends


class _BackendMixin:
    def _init_backend(self, backend: str) -> None:
        self.backend = backends.check_backend(backend)

    def __setattr__(self, name, value):
        if name == "backend":
            backends.check_backend(value)
        super().__setattr__(name, value)


class SelfAttention2d(_BackendMixin, nn.Module):
    """The inpainting document's self-attention block, with q, k, v from one fused convolution.

    ``y = x + out(attention(q, k, v))`` where ``q, k, v = qkv(x).split(out_channels)``: ``qkv`` is one
    Conv2d(in_channels, 3·out_channels, kernel_size, padding=kernel_size//2) and ``out`` a 1×1
    Conv2d(out_channels, in_channels). Attention runs over pixels (``patch_size=1``) or p×p patches,
    with ``heads`` heads; the head dim is D = out_channels/heads·p². The softmax scale follows the
    document, 1/sqrt(in_channels), for heads=1 and patch_size=1 (it divides by the input's channel
    count), and is 1/sqrt(D) otherwise; ``scale=`` overrides both.

    A state_dict of the document's block (``conv_q``, ``conv_k``, ``conv_v``, ``conv_out``) loads
    directly: the three convolutions are concatenated into ``qkv``.

    x: (B, in_channels, H, W) -> (B, in_channels, H, W); H and W divisible by patch_size.
    """

    def __init__(self, in_channels, out_channels=None, *, heads=1, patch_size=1, kernel_size=3, scale=None,
                 backend="auto"):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        if out_channels % heads:
            raise ValueError(f"SelfAttention2d: heads = {heads} does not divide out_channels = {out_channels}")
        if kernel_size % 2 != 1:
            raise ValueError(f"SelfAttention2d: kernel_size must be odd to keep H×W, got {kernel_size}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.heads, self.patch_size, self.kernel_size = heads, patch_size, kernel_size
        if scale is None:
            default_d = in_channels if heads == 1 and patch_size == 1 else out_channels // heads * patch_size**2
            scale = 1.0 / math.sqrt(default_d)
        self.scale = float(scale)
        self.qkv = nn.Conv2d(in_channels, 3 * out_channels, kernel_size, padding=kernel_size // 2)
        self.out = nn.Conv2d(out_channels, in_channels, 1)
        self._init_backend(backend)
        self._register_load_state_dict_pre_hook(self._fuse_document_keys)

    def forward(self, x):
        q, k, v = self.qkv(x).split(self.out_channels, dim=1)
        a = backends.image_attention(q, k, v, heads=self.heads, patch_size=self.patch_size, scale=self.scale,
                                     backend=self.backend)
        return x + self.out(a)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, heads={self.heads}, patch_size={self.patch_size}, "
                f"kernel_size={self.kernel_size}, scale={self.scale:.4g}, backend={self.backend!r}")

    @staticmethod
    def _fuse_document_keys(state_dict, prefix, *args, **kwargs):
        """conv_q/conv_k/conv_v/conv_out (the document's block) -> qkv/out, in place."""
        names = ("conv_q", "conv_k", "conv_v")
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{n}.{kind}" for n in names]
            if all(k in state_dict for k in keys):
                state_dict[f"{prefix}qkv.{kind}"] = torch.cat([state_dict.pop(k) for k in keys], dim=0)
            old = f"{prefix}conv_out.{kind}"
            if old in state_dict:
                state_dict[f"{prefix}out.{kind}"] = state_dict.pop(old)
