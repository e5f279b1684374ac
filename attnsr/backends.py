"""Backend dispatch: one function per op, four ways to compute it.

- ``naive``: the source documents' code (bmm + softmax that materialises the N×N score matrix;
  gates with pooling modules and 1×1 convolutions). The benchmark baseline.
- ``torch``: the best pure PyTorch: SDPA on 4-D (B, heads, N, D) tensors with a contiguous last
  dim (so it can take its flash path), the functional eager gating of attnsr.kernels.reference.
- ``triton``: the fused kernels of :mod:`kernels`.
- ``auto``: ``torch`` for CPU tensors (the fused kernels would need Triton's slow interpreter); for
  CUDA tensors, per op and shape class, the faster of ``triton`` and ``torch`` as ``attnsr tune``
  measured it on that device (kept in the user's cache directory, see ``attnsr.kernels._tuned``),
  and until it is measured the shipped choice (``shipped_choice``: what the H200 run of
  benchmarks/results/nvidia-h200-2026-11-30.json measured). A shape class: the op, the dtype class,
  padded head dim, tokens and batch × heads rounded to powers of two, and whether the call trains
  (an input requires grad) or only infers (``auto_key``).

Autocast, one rule for every backend: inside ``torch.autocast`` an op casts its floating-point
tensors other than float64 to the autocast dtype (as autocast does for matmuls and convolutions)
and returns the autocast dtype (``autocast_inputs``; the fused ops apply the same function, also
to direct ``torch.ops.attnsr.*`` calls).
"""

import functools
import math

import torch
import torch.nn.functional as F


def _kernels():
    """The kernels package, imported on first use: importing attnsr does not import triton, so
    TRITON_INTERPRET can still be set after ``import attnsr`` (it must precede triton's import)."""
    import attnsr.kernels
    import attnsr.kernels.reference  # kernels.reference is used through the package

    return attnsr.kernels

BACKENDS = ("naive", "torch", "triton", "auto")


def autocast_inputs(*args):
    """The autocast rule of every op and backend (see the module docstring)."""
    from attnsr.kernels._runtime import autocast_inputs as rule

    return rule(*args)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def resolve(backend: str, x: torch.Tensor, key=None) -> str:
    """The concrete backend for a call on ``x``. ``auto``: ``torch`` on the CPU; on CUDA the
    measured choice of the call's shape class ``key()`` (a callable, built only here), else the
    shipped one."""
    check_backend(backend)
    if backend != "auto":
        return backend
    if not x.is_cuda:
        return "torch"
    if key is None:
        return "triton"
    from attnsr.kernels import _tuned

    cls = key()
    return _tuned.backend_choice(x.device, cls) or shipped_choice(cls)


def _mode(*tensors) -> str:
    """"train" when the call will be differentiated (grad mode on, an input requires grad), else "infer"."""
    if torch.is_grad_enabled():
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                return "train"
    return "infer"


def _dtype_class(t: torch.Tensor) -> str:
    from attnsr.kernels import _runtime, _tuned

    return _tuned.dtype_class(t.dtype, _runtime.dot_precision(t.dtype))


def auto_key(op: str, x: torch.Tensor, *, head_dim: int = 0, tokens: int = 0, batch_heads: int = 0, patch: int = 1,
             mode: str = "infer") -> str:
    """The shape class of an op call that ``auto`` decides by (``attnsr tune`` records its choices
    under these keys). ``op``: "attention", "window", "channel_gate", "spatial_gate", "cbam_gate" or
    "layer_fusion"; tokens: the attention's sequence length, a window's tokens, or a map's pixels."""
    from attnsr.kernels import _tuned

    parts = [op, _dtype_class(x)]
    if head_dim:
        parts.append(f"d{max(16, 1 << (head_dim - 1).bit_length())}")
    if op == "attention":
        parts.append(f"p{patch}")
    if op == "window":
        parts.append(f"n{tokens}")
    elif tokens:
        parts.append(f"n{_tuned.tokens_class(tokens)}")
    if batch_heads:
        parts.append(f"bh{_tuned.programs_class(batch_heads)}")
    parts.append(mode)
    return "/".join(parts)


def shipped_choice(key: str) -> str:
    """``auto``'s choice where nothing was measured on the device, from the H200 run
    (benchmarks/results/nvidia-h200-2026-11-30.json, fused time ÷ the ``torch`` path's):

    - attention, fp32 (3×TF32) or tf32, inference, head dim ≤ 64, at least 4096 tokens: ``triton``
      (fp32 forward 1.40–1.50× SDPA at D = 64; tf32 forward 3.5–3.9×). Everything else ``torch``:
      16-bit attention (forward 0.54–0.85×, forward+backward 0.48–0.72× SDPA), fp32 training (0.96–1.01×
      at D = 64, 0.49× at D = 128), head dim 128 (fp32 forward 0.86×), small maps (16×64×32², fp32
      forward 0.57×), 2×2 patches (0.15–0.32×);
    - window attention, 16-bit, training: ``triton`` (HAT's HAB block forward+backward 1.25× the
      block on SDPA); fp32 windows ``torch`` (0.68×); inference not measured: ``torch``;
    - the gates (CBAM: 0.60–0.68× eager) and layer fusion (not measured): ``torch``.
    """
    parts = key.split("/")
    op, dtype, mode = parts[0], parts[1], parts[-1]
    if op == "attention":
        fields = {p[0]: p[1:] for p in parts[2:-1] if p[:1] in ("d", "p", "n")}
        if (dtype in ("fp32", "tf32") and mode == "infer" and int(fields.get("d", 999)) <= 64
                and fields.get("p") == "1" and int(fields.get("n", 0)) >= 4096):
            return "triton"
        return "torch"
    if op == "window" and dtype in ("bf16", "fp16") and mode == "train":
        return "triton"
    return "torch"


# ----------------------------------------------------------------------------------------------
# Self-attention over feature maps
# ----------------------------------------------------------------------------------------------


def image_attention(q, k, v, *, heads=1, patch_size=1, scale=None, backend="auto", packed=None):
    """Self-attention over the pixels or patches of q, k, v: (B, C, H, W) -> (B, C, H, W).

    Same semantics as :func:`attnsr.kernels.image_attention` on every backend. ``packed``: used by
    :func:`image_attention_qkv` (the qkv map q, k, v were split from).
    """
    q, k, v = autocast_inputs(q, k, v)

    def key():
        b, c, h, w = q.shape
        return auto_key("attention", q, head_dim=c // max(1, heads) * patch_size * patch_size,
                        tokens=(h // patch_size) * (w // patch_size), batch_heads=b * heads, patch=patch_size,
                        mode=_mode(q, k, v))

    backend = resolve(backend, q, key)
    if backend == "triton" and packed is not None:
        return _kernels().image_attention_qkv(packed, heads=heads, patch_size=patch_size, scale=scale)
    if backend == "triton":
        return _kernels().image_attention(q, k, v, heads=heads, patch_size=patch_size, scale=scale)
    b, c, h, w = q.shape
    d = c // heads * patch_size * patch_size
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if backend == "naive" and heads == 1 and patch_size == 1:
        # the inpainting document's block, literally: (B, C, N) maps, bmm, softmax, bmm
        qf, kf, vf = (t.reshape(b, c, h * w) for t in (q, k, v))
        attn = torch.softmax(torch.bmm(qf.transpose(1, 2), kf) * scale, dim=-1)
        return torch.bmm(vf, attn.transpose(1, 2)).reshape(b, c, h, w)
    tq, tk, tv = (_kernels().reference.image_to_tokens(t, heads, patch_size) for t in (q, k, v))
    if backend == "naive":
        attn = torch.softmax(torch.matmul(tq, tk.transpose(-1, -2)) * scale, dim=-1)
        out = torch.matmul(attn, tv)
    else:
        # image_to_tokens returns (B, heads, N, D) with a contiguous last dim: SDPA's fast paths
        out = F.scaled_dot_product_attention(tq.contiguous(), tk.contiguous(), tv.contiguous(), scale=scale)
    return _kernels().reference.tokens_to_image(out, c, h, w, patch_size)


def image_attention_qkv(qkv, *, heads=1, patch_size=1, scale=None, backend="auto"):
    """``image_attention`` of q, k, v = qkv.split(C, 1) of a (B, 3C, H, W) map -> (B, C, H, W); on
    the fused kernels the gradient of qkv is written as one buffer (no ``cat`` of three)."""
    (qkv,) = autocast_inputs(qkv)
    q, k, v = qkv.split(qkv.shape[1] // 3, 1)
    return image_attention(q, k, v, heads=heads, patch_size=patch_size, scale=scale, backend=backend, packed=qkv)


@functools.lru_cache(maxsize=64)
def _window_index(window: tuple, device: torch.device) -> torch.Tensor:
    """Swin's relative position index of a window, flattened, on ``device`` (built once)."""
    return _kernels().reference.relative_position_index(window).reshape(-1).to(device)


@functools.lru_cache(maxsize=64)
def _shift_mask(height: int, width: int, window: tuple, shift: tuple, device: torch.device) -> torch.Tensor:
    """Swin's (nW, N, N) shifted-window mask on ``device`` (built once per size)."""
    return _kernels().reference.swin_shift_mask(height, width, window, shift, dtype=torch.float32, device=device)


def window_attention(q, k, v, *, window_size, shift_size=0, heads=1, bias_table=None, mask=None, scale=None,
                     backend="auto", packed=None):
    """Swin window attention of (B, H, W, C) maps -> (B, H, W, C); the semantics of
    :func:`attnsr.kernels.window_attention` on every backend (the same checks, ``mask=False`` for no
    mask even when shifted). ``naive``: SwinIR's maths as written (roll, partition, q·kᵀ + bias +
    mask, softmax, reverse); ``torch``: the same partition with SDPA and the bias and mask as its
    float mask (4-D, last dim contiguous; the index and Swin's mask built once per size and device).
    ``packed``: used by :func:`window_attention_qkv` (the qkv map q, k, v were split from)."""
    q, k, v = autocast_inputs(q, k, v)

    def key():
        return auto_key("window", q, head_dim=q.shape[-1] // max(1, heads),
                        tokens=math.prod((window_size,) * 2 if isinstance(window_size, int) else window_size),
                        mode=_mode(q, k, v, bias_table))

    backend = resolve(backend, q, key)
    if backend == "triton" and packed is not None:
        return _kernels().window_attention_qkv(packed, window_size=window_size, shift_size=shift_size, heads=heads,
                                               bias_table=bias_table, mask=mask, scale=scale)
    if backend == "triton":
        return _kernels().window_attention(q, k, v, window_size=window_size, shift_size=shift_size, heads=heads,
                                           bias_table=bias_table, mask=mask, scale=scale)
    from attnsr.kernels.window_attention import check_window_args

    q, k, v, heads, (wh, ww), (sh, sw), mask, scale = check_window_args(q, k, v, window_size, shift_size, heads,
                                                                        bias_table, mask, scale)
    if backend == "naive":
        return _kernels().reference.window_attention_ref(q, k, v, window_size=(wh, ww), shift_size=(sh, sw),
                                                         heads=heads, bias_table=bias_table, mask=mask, scale=scale)
    ref = _kernels().reference
    b, h, w, _ = q.shape
    n, nw = wh * ww, (h // wh) * (w // ww)
    extra = None
    if bias_table is not None:
        extra = bias_table[_window_index((wh, ww), bias_table.device)].reshape(n, n, heads).permute(2, 0, 1)[None]
    if mask is None and (sh or sw):
        mask = _shift_mask(h, w, (wh, ww), (sh, sw), q.device)
    if mask is not None and mask is not False:  # the batch's windows cycle through the mask's slices
        per_window = mask.repeat(b * nw // mask.shape[0], 1, 1)[:, None]  # (B·nW, 1, N, N): heads broadcast
        extra = per_window if extra is None else extra + per_window  # one (B·nW, heads, N, N) sum with a bias
    if extra is not None:
        extra = extra.to(q.dtype)
    # 4-D windows with a contiguous last dim (SDPA's fast paths), the same partition as the reference's
    qw, kw, vw = (ref.window_partition(t, (wh, ww), (sh, sw), heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=extra, scale=scale)
    return ref.window_reverse(out, h, w, (wh, ww), (sh, sw))


def window_attention_qkv(qkv, *, window_size, shift_size=0, heads=1, bias_table=None, mask=None, scale=None,
                         backend="auto"):
    """``window_attention`` of q, k, v = qkv.split(C, -1) of a (B, H, W, 3C) map -> (B, H, W, C); on
    the fused kernels the gradient of qkv is written as one buffer (no ``cat`` of three)."""
    (qkv,) = autocast_inputs(qkv)
    q, k, v = qkv.split(qkv.shape[-1] // 3, -1)
    return window_attention(q, k, v, window_size=window_size, shift_size=shift_size, heads=heads,
                            bias_table=bias_table, mask=mask, scale=scale, backend=backend, packed=qkv)


# ----------------------------------------------------------------------------------------------
# Gating and layer fusion. naive: the documents' module code, written out (pooling modules, 1×1
# convolutions on (B, C, 1, 1) maps, torch.max over channels, torch.cat, a loop over the layers);
# torch: the plain functional maths of attnsr.kernels.reference. Two independent writings, so
# comparing the backends compares something.
# ----------------------------------------------------------------------------------------------


_NAIVE_ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def _naive_channel_gate(x, w1, b1, w2, b2, pool, act="relu"):
    """RCAN's CALayer / CBAM's ChannelGate as written: pool to (B, C, 1, 1), conv 1×1, ReLU (or
    ``act``), conv 1×1."""

    def mlp(pooled):
        hidden = _NAIVE_ACTS[act](F.conv2d(pooled, w1[:, :, None, None], b1))
        return F.conv2d(hidden, w2[:, :, None, None], b2)

    z = mlp(F.adaptive_avg_pool2d(x, 1))
    if pool == "avgmax":
        z = z + mlp(F.adaptive_max_pool2d(x, 1))
    elif pool != "avg":
        raise ValueError(f"channel_gate: pool={pool!r}; expected 'avg' or 'avgmax'")
    return x * torch.sigmoid(z)


def _naive_spatial_gate(x, weight, bias):
    """CBAM's SpatialGate as written: cat([mean over C, max over C]), conv k×k, sigmoid."""
    avg = torch.mean(x, dim=1, keepdim=True)
    mx, _ = torch.max(x, dim=1, keepdim=True)
    return x * torch.sigmoid(F.conv2d(torch.cat([avg, mx], dim=1), weight, bias, padding=weight.shape[-1] // 2))


def _gate_key(op: str, x: torch.Tensor, *params) -> str:
    """A gate's shape class: channels (as a head dim: padded to a power of two) and pixels per map."""
    return auto_key(op, x, head_dim=x.shape[1], tokens=x.shape[2] * x.shape[3], mode=_mode(x, *params))


def channel_gate(x, w1, b1, w2, b2, *, pool="avg", act="relu", backend="auto"):
    """x · sigmoid(mlp(avg_hw x) [+ mlp(max_hw x)]), mlp's hidden activation ``act`` ("relu",
    "gelu", "silu"): (B, C, H, W) -> (B, C, H, W)."""
    x, w1, b1, w2, b2 = autocast_inputs(x, w1, b1, w2, b2)
    if act not in _NAIVE_ACTS:
        raise ValueError(f"channel_gate: act={act!r}; expected one of {', '.join(map(repr, _NAIVE_ACTS))}")
    backend = resolve(backend, x, lambda: _gate_key("channel_gate", x, w1, b1, w2, b2))
    if backend == "triton":
        return _kernels().channel_gate(x, w1, b1, w2, b2, pool=pool, act=act)
    if backend == "naive":
        return _naive_channel_gate(x, w1, b1, w2, b2, pool, act)
    return _kernels().reference.channel_gate_ref(x, w1, b1, w2, b2, pool=pool, act=act)


def spatial_gate(x, weight, bias=None, *, backend="auto"):
    """x · sigmoid(conv_k×k([mean_c x, max_c x])): (B, C, H, W) -> (B, C, H, W)."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    backend = resolve(backend, x, lambda: _gate_key("spatial_gate", x, weight, bias))
    if backend == "triton":
        return _kernels().spatial_gate(x, weight, bias)
    if backend == "naive":
        return _naive_spatial_gate(x, weight, bias)
    return _kernels().reference.spatial_gate_ref(x, weight, bias)


def cbam_gate(x, w1, b1, w2, b2, sweight, sbias, *, pool="avgmax", backend="auto"):
    """spatial_gate(channel_gate(x)): (B, C, H, W) -> (B, C, H, W)."""
    x, w1, b1, w2, b2, sweight, sbias = autocast_inputs(x, w1, b1, w2, b2, sweight, sbias)
    backend = resolve(backend, x, lambda: _gate_key("cbam_gate", x, w1, b1, w2, b2, sweight, sbias))
    if backend == "triton":
        return _kernels().cbam_gate(x, w1, b1, w2, b2, sweight, sbias, pool=pool)
    if backend == "naive":
        return _naive_spatial_gate(_naive_channel_gate(x, w1, b1, w2, b2, pool), sweight, sbias)
    return _kernels().reference.cbam_gate_ref(x, w1, b1, w2, b2, sweight, sbias, pool=pool)


def layer_fusion(features, weights, *, backend="auto"):
    """Σ_l weights[:, l] · features[l] for L maps (B, C, H, W) (a sequence or an (L, B, ...) tensor)."""
    features, weights = autocast_inputs(features, weights)
    backend = resolve(backend, weights,
                      lambda: auto_key("layer_fusion", weights, tokens=features[0][0].numel(),
                                       mode=_mode(weights, *(features if isinstance(features, (list, tuple))
                                                             else (features,)))))
    if backend == "triton":
        return _kernels().layer_fusion(features, weights)
    if backend == "naive":  # the SR document's Σ_l w_l · f_l, one map at a time
        out = weights[:, 0, None, None, None] * features[0]
        for i in range(1, len(features)):
            out = out + weights[:, i, None, None, None] * features[i]
        return out
    return _kernels().reference.layer_fusion_ref(features, weights)


def transposed_attention_qkv(qkv, temperature, *, heads, backend="auto"):
    """Restormer's transposed (channel) attention: per head, softmax over channels of
    τ · normalize(q) normalize(k)ᵀ applied to v.
    ``naive`` and ``torch`` run Restormer's own maths (F.normalize, matmul, softmax: it never
    builds more than the d × d map); ``auto`` takes ``torch`` until the fused op is measured faster.
    qkv: (B, 3C, H, W), q, k, v its ``chunk(3, dim=1)``; temperature (heads, 1, 1)."""
    qkv, temperature = autocast_inputs(qkv, temperature)
    q, k, v = qkv.chunk(3, dim=1)
    backend = resolve(backend, q, lambda: auto_key("transposed_attention", q, head_dim=q.shape[1] // heads,
                                                   tokens=q.shape[2] * q.shape[3], mode=_mode(q, k, v, temperature)))
    if backend == "triton":
        return _kernels().transposed_attention_qkv(qkv, temperature, heads=heads)
    return _kernels().reference.transposed_attention_ref(q, k, v, temperature, heads=heads)
