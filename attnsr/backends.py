"""Backend dispatch: one function per op, four ways to compute it.

- ``naive``: the source documents' literal maths (bmm + softmax that materialises the N×N score
  matrix; eager gating). The benchmark baseline.
- ``torch``: the best pure PyTorch: SDPA on 4-D (B, heads, N, D) tensors with a contiguous last
  dim (so it can take its flash path), eager gating.
- ``triton``: the fused kernels of :mod:`kernels`.
- ``auto``: ``triton`` for CUDA tensors, ``torch`` otherwise (CPU tensors would need Triton's slow
  interpreter).
"""

import math

import torch
import torch.nn.functional as F

BACKENDS = ("naive", "torch", "triton", "auto")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def resolve(backend: str, x: torch.Tensor) -> str:
    """The concrete backend for a call on ``x``: ``auto`` becomes ``triton`` on CUDA, else ``torch``."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    return backend


# ----------------------------------------------------------------------------------------------
# Self-attention over feature maps
# ----------------------------------------------------------------------------------------------


def _to_tokens(x, heads, p):
    from kernels.reference import image_to_tokens

    return image_to_tokens(x, heads, p)


def _to_image(t, like, p):
    from kernels.reference import tokens_to_image

    _, c, h, w = like.shape
    return tokens_to_image(t, c, h, w, p)


def image_attention(q, k, v, *, heads=1, patch_size=1, scale=None, backend="auto"):
    """Self-attention over the pixels or patches of q, k, v: (B, C, H, W) -> (B, C, H, W).

    Same semantics as :func:`kernels.image_attention` on every backend.
    """
    backend = resolve(backend, q)
    if backend == "triton":
        from kernels import image_attention as fused

        return fused(q, k, v, heads=heads, patch_size=patch_size, scale=scale)
    b, c, h, w = q.shape
    d = c // heads * patch_size * patch_size
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if backend == "naive" and heads == 1 and patch_size == 1:
        # the inpainting document's block, literally: (B, C, N) maps, bmm, softmax, bmm
        qf, kf, vf = (t.reshape(b, c, h * w) for t in (q, k, v))
        attn = torch.softmax(torch.bmm(qf.transpose(1, 2), kf) * scale, dim=-1)
        return torch.bmm(vf, attn.transpose(1, 2)).reshape(b, c, h, w)
    tq, tk, tv = (_to_tokens(t, heads, patch_size) for t in (q, k, v))
    if backend == "naive":
        attn = torch.softmax(torch.matmul(tq, tk.transpose(-1, -2)) * scale, dim=-1)
        out = torch.matmul(attn, tv)
    else:
        # image_to_tokens returns (B, heads, N, D) with a contiguous last dim: SDPA's fast paths
        out = F.scaled_dot_product_attention(tq.contiguous(), tk.contiguous(), tv.contiguous(), scale=scale)
    return _to_image(out, q, patch_size)
