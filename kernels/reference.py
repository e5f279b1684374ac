"""Plain PyTorch references of every op: the ground truth of tests and the baseline of benchmarks.

Written for clarity, not speed. Each takes ``upcast=True`` to compute in float64 (the accuracy
reference of the tests); the result is returned in float64 then.
"""

import math

import torch


def _maybe_upcast(upcast: bool, *tensors):
    if not upcast:
        return tensors
    return tuple(t if t is None or t is False else t.double() for t in tensors)


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
# Shifted-window attention (Swin: SwinIR, HAT, DRCT, ...)
# ----------------------------------------------------------------------------------------------


def _pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)


def relative_position_index(window_size) -> torch.Tensor:
    """(N, N) index into Swin's relative position bias table for a Wh×Ww window, as Swin builds it:
    (yᵢ − yⱼ + Wh − 1)·(2Ww − 1) + (xᵢ − xⱼ + Ww − 1)."""
    wh, ww = _pair(window_size)
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def swin_shift_mask(height: int, width: int, window_size, shift_size, dtype=torch.float32, device=None):
    """Swin's attention mask of shifted windows, (nW, N, N): the rolled map is labelled by the
    regions its rows and columns came from (slices [0, −Wh), [−Wh, −sh), [−sh, ∞) of each axis), and
    pairs of tokens of one window from different regions get −100, the others 0."""
    (wh, ww), (sh, sw) = _pair(window_size), _pair(shift_size)
    labels = torch.zeros(height, width)
    rows = (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)) if sh else (slice(None),)
    cols = (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)) if sw else (slice(None),)
    for i, hs in enumerate(rows):
        for j, ws in enumerate(cols):
            labels[hs, ws] = 3 * i + j
    windows = labels.view(height // wh, wh, width // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    differ = windows[:, None, :] != windows[:, :, None]
    return torch.where(differ, -100.0, 0.0).to(dtype=dtype, device=device)


def window_partition(x, window_size, shift_size=0, heads=1):
    """Swin's cyclic shift and window partition: (B, H, W, C) rolled by (−sh, −sw), cut into Wh×Ww
    windows -> (B·nW, heads, N, C/heads), windows in row-major order, the last dim contiguous."""
    (wh, ww), (sh, sw) = _pair(window_size), _pair(shift_size)
    b, h, w, c = x.shape
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    x = x.reshape(b, h // wh, wh, w // ww, ww, heads, c // heads).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(-1, heads, wh * ww, c // heads)


def window_reverse(x, height: int, width: int, window_size, shift_size=0):
    """The inverse of :func:`window_partition`: (B·nW, heads, N, d) -> (B, H, W, heads·d)."""
    (wh, ww), (sh, sw) = _pair(window_size), _pair(shift_size)
    heads, d = x.shape[1], x.shape[3]
    x = x.reshape(-1, height // wh, width // ww, heads, wh, ww, d).permute(0, 1, 4, 2, 5, 3, 6)
    x = x.reshape(-1, height, width, heads * d)
    return torch.roll(x, shifts=(sh, sw), dims=(1, 2)) if sh or sw else x


def window_attention_ref(q, k, v, *, window_size, shift_size=0, heads=1, bias_table=None, mask=None, scale=None,
                         upcast=False):
    """Swin window attention on (B, H, W, C) maps -> (B, H, W, C), written as SwinIR computes it:
    roll by (−sh, −sw), partition into windows, softmax(q·scale kᵀ + bias + mask) v per window and
    head, reverse the partition, roll back. A shifted call without ``mask`` uses Swin's mask;
    ``mask=False``: none."""
    q, k, v, bias_table, mask = _maybe_upcast(upcast, q, k, v, bias_table, mask)
    (wh, ww), (sh, sw) = _pair(window_size), _pair(shift_size)
    b, h, w, c = q.shape
    n, nw = wh * ww, (h // wh) * (w // ww)
    scale = (c // heads) ** -0.5 if scale is None else scale
    qw, kw, vw = (window_partition(t, (wh, ww), (sh, sw), heads) for t in (q, k, v))
    attn = (qw * scale) @ kw.transpose(-2, -1)
    if bias_table is not None:
        bias = bias_table[relative_position_index((wh, ww)).reshape(-1).to(bias_table.device)]
        attn = attn + bias.reshape(n, n, heads).permute(2, 0, 1)[None]
    if mask is None and (sh or sw):
        mask = swin_shift_mask(h, w, (wh, ww), (sh, sw), dtype=attn.dtype, device=attn.device)
    if mask is not None and mask is not False:  # False: no mask, even when shifted
        m = mask.shape[0]  # the batch's b·nW windows cycle through the mask's M slices, as in SwinIR
        attn = (attn.reshape(b * nw // m, m, heads, n, n) + mask.to(attn.dtype)[None, :, None]).reshape(b * nw, heads,
                                                                                                          n, n)
    return window_reverse(attn.softmax(-1) @ vw, h, w, (wh, ww), (sh, sw))


# ----------------------------------------------------------------------------------------------
# Gating (channel, spatial, CBAM) and layer-attention fusion
# ----------------------------------------------------------------------------------------------


def _max_first(x, dim: int):
    """Max over ``dim`` whose gradient goes to one element: the first index attaining the max."""
    idx = x.argmax(dim, keepdim=True)  # torch.argmax returns the first maximal index
    return x.gather(dim, idx).squeeze(dim)


ACTIVATIONS = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}


def _channel_mlp(s, w1, b1, w2, b2, act="relu"):
    """w2 · act(w1 · s + b1) + b2 for s: (B, C), w1: (C//r, C), w2: (C, C//r)."""
    return torch.nn.functional.linear(ACTIVATIONS[act](torch.nn.functional.linear(s, w1, b1)), w2, b2)


def channel_gate_ref(x, w1, b1, w2, b2, *, pool="avg", act="relu", upcast=False):
    """x · sigmoid(mlp(avg_hw x)) (pool="avg") or x · sigmoid(mlp(avg) + mlp(max)) (pool="avgmax"),
    mlp's hidden activation ``act`` ("relu", "gelu": the erf form, "silu").

    x: (B, C, H, W) -> (B, C, H, W); w1: (C//r, C), w2: (C, C//r), biases may be None.
    """
    x, w1, b1, w2, b2 = _maybe_upcast(upcast, x, w1, b1, w2, b2)
    z = _channel_mlp(x.mean((2, 3)), w1, b1, w2, b2, act)
    if pool == "avgmax":
        z = z + _channel_mlp(_max_first(x.flatten(2), 2), w1, b1, w2, b2, act)
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


# ----------------------------------------------------------------------------------------------
# Transposed (channel) attention: Restormer's MDTA
# ----------------------------------------------------------------------------------------------


def transposed_attention_ref(q, k, v, temperature, *, heads, upcast=False):
    """Restormer's Attention after its convolutions: per head, the d = C/heads channels of q and k
    over the H·W pixels, L2-normalised along the pixels (F.normalize), attn = softmax(q kᵀ · τ)
    over channels (d × d), out = attn v. q, k, v: (B, C, H, W); temperature: (heads, 1, 1) or (heads,)."""
    import torch.nn.functional as F

    q, k, v, temperature = _maybe_upcast(upcast, q, k, v, temperature)
    b, c, h, w = q.shape
    q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in (q, k, v))
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1)) * temperature.reshape(heads, 1, 1)
    attn = attn.softmax(dim=-1)
    return (attn @ v).reshape(b, c, h, w)
