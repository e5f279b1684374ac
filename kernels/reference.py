"""Plain PyTorch references of every op: the ground truth of tests and the baseline of benchmarks.

Written for clarity, not speed. Each takes ``upcast=True`` to compute in float64 (the accuracy
reference of the tests); the result is returned in float64 then.
"""

import math

import torch


def _maybe_upcast(upcast: bool, *tensors):
    if not upcast:
        return tensors
    return tuple(None if t is None else t.double() for t in tensors)


# ----------------------------------------------------------------------------------------------
# Self-attention
# ----------------------------------------------------------------------------------------------


def flash_attention_ref(q, k, v, *, scale=None, upcast=False):
    """softmax(q kᵀ · scale) v with q: (B, H, N, D), k, v: (B, H, M, D) -> (B, H, N, D)."""
    q, k, v = _maybe_upcast(upcast, q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v)


def image_to_tokens(x, heads: int, patch_size: int):
    """(B, C, H, W) map -> (B, heads, N, D) tokens.

    Head h owns channels [h·C/heads, (h+1)·C/heads). A token is one p×p patch, numbered row-major
    over the (H/p, W/p) patch grid; its vector lists the head's channels, then the patch rows, then
    the patch columns: D = C/heads·p·p.
    """
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, heads, c // heads, h // p, p, w // p, p)
    x = x.permute(0, 1, 3, 5, 2, 4, 6)  # b, head, patch row, patch col, channel, i, j
    return x.reshape(b, heads, (h // p) * (w // p), (c // heads) * p * p)


def tokens_to_image(t, channels: int, height: int, width: int, patch_size: int):
    """Inverse of :func:`image_to_tokens`: (B, heads, N, D) -> (B, C, H, W)."""
    b, heads = t.shape[:2]
    p = patch_size
    t = t.reshape(b, heads, height // p, width // p, channels // heads, p, p)
    t = t.permute(0, 1, 4, 2, 5, 3, 6)  # b, head, channel, patch row, i, patch col, j
    return t.reshape(b, channels, height, width)


def image_attention_ref(q, k, v, *, heads=1, patch_size=1, scale=None, upcast=False):
    """Self-attention over the pixels (p=1) or p×p patches of (B, C, H, W) maps -> (B, C, H, W)."""
    q, k, v = _maybe_upcast(upcast, q, k, v)
    _, c, h, w = q.shape
    tq, tk, tv = (image_to_tokens(t, heads, patch_size) for t in (q, k, v))
    out = flash_attention_ref(tq, tk, tv, scale=scale)
    return tokens_to_image(out, c, h, w, patch_size)
