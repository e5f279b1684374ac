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


# ----------------------------------------------------------------------------------------------
# Gating (channel, spatial, CBAM) and layer-attention fusion
# ----------------------------------------------------------------------------------------------


def _max_first(x, dim: int):
    """Max over ``dim`` whose gradient goes to one element: the first index attaining the max."""
    idx = x.argmax(dim, keepdim=True)  # torch.argmax returns the first maximal index
    return x.gather(dim, idx).squeeze(dim)


def _channel_mlp(s, w1, b1, w2, b2):
    """w2 · relu(w1 · s + b1) + b2 for s: (B, C), w1: (C//r, C), w2: (C, C//r)."""
    return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(s, w1, b1)), w2, b2)


def channel_gate_ref(x, w1, b1, w2, b2, *, pool="avg", upcast=False):
    """x · sigmoid(mlp(avg_hw x)) (pool="avg") or x · sigmoid(mlp(avg) + mlp(max)) (pool="avgmax").

    x: (B, C, H, W) -> (B, C, H, W); w1: (C//r, C), w2: (C, C//r), biases may be None.
    """
    x, w1, b1, w2, b2 = _maybe_upcast(upcast, x, w1, b1, w2, b2)
    z = _channel_mlp(x.mean((2, 3)), w1, b1, w2, b2)
    if pool == "avgmax":
        z = z + _channel_mlp(_max_first(x.flatten(2), 2), w1, b1, w2, b2)
    elif pool != "avg":
        raise ValueError(f"channel_gate_ref: pool={pool!r}; expected 'avg' or 'avgmax'")
    return x * torch.sigmoid(z)[:, :, None, None]


def spatial_gate_ref(x, weight, bias=None, *, upcast=False):
    """x · sigmoid(conv2d([mean_c x, max_c x], weight (1, 2, k, k), bias, padding k//2)).

    x: (B, C, H, W) -> (B, C, H, W). The max over channels sends its gradient to the first
    arg-max channel.
    """
    x, weight, bias = _maybe_upcast(upcast, x, weight, bias)
    pooled = torch.stack([x.mean(1), _max_first(x, 1)], dim=1)  # (B, 2, H, W)
    pre = torch.nn.functional.conv2d(pooled, weight, bias, padding=weight.shape[-1] // 2)
    return x * torch.sigmoid(pre)


def cbam_gate_ref(x, w1, b1, w2, b2, sweight, sbias, *, pool="avgmax", upcast=False):
    """spatial_gate_ref(channel_gate_ref(x, ...), sweight, sbias): eager CBAM, x · ca materialised."""
    x1 = channel_gate_ref(x, w1, b1, w2, b2, pool=pool, upcast=upcast)
    return spatial_gate_ref(x1, sweight, sbias, upcast=upcast)


def layer_fusion_ref(features, weights, *, upcast=False):
    """Σ_l weights[b, l] · features[l][b]: features (L, B, C, H, W) or L maps (B, C, H, W), weights (B, L)."""
    if not isinstance(features, torch.Tensor):
        features = torch.stack(list(features))
    features, weights = _maybe_upcast(upcast, features, weights)
    return torch.einsum("lbchw,bl->bchw", features, weights)
