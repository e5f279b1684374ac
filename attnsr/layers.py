"""Attention layers for image-restoration networks, each with four interchangeable backends.

Every backend of a layer has the same parameters and state_dict keys: a checkpoint trained with
one loads into another, and ``layer.backend = "triton"`` switches a built layer.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnsr import backends


class _AttnsrLayer(nn.Module):
    """Shared by attnsr's layers: a checked ``backend`` attribute and checkpoint key aliases.

    ``self.checkpoint_aliases`` maps one of the layer's state_dict keys to the keys of another
    layout of the same weights (concatenated along dim 0, then reshaped): a state_dict written by
    the module this layer replaced loads without conversion.
    """

    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend
        self.checkpoint_aliases = {}
        self._register_load_state_dict_pre_hook(self._load_aliases)

    @classmethod
    def _blank(cls, backend: str):
        """An instance with only the base's state (backend, aliases), bypassing ``cls.__init__``:
        the ``from_module`` constructors fill in the rest from the module they replace."""
        layer = cls.__new__(cls)
        _AttnsrLayer.__init__(layer, backend)
        return layer

    def __setattr__(self, name, value):
        if name == "backend":
            backends.check_backend(value)
        super().__setattr__(name, value)

    def _load_aliases(self, state_dict, prefix, *args, **kwargs):
        for ours, sources in self.checkpoint_aliases.items():
            keys = [prefix + k for k in sources]
            if prefix + ours in state_dict or not all(k in state_dict for k in keys):
                continue
            target = self.get_parameter(ours)
            state_dict[prefix + ours] = torch.cat([state_dict.pop(k) for k in keys], dim=0).reshape(target.shape)


def adopt(layer: nn.Module, module: nn.Module) -> nn.Module:
    """Give ``layer`` the children, parameters and buffers of ``module`` (the same objects, under
    the same names: state_dict keys, optimizers and ``requires_grad`` flags carry over) and its mode."""
    for store in ("_modules", "_parameters", "_buffers"):
        getattr(layer, store).update(getattr(module, store))
    layer._non_persistent_buffers_set.update(module._non_persistent_buffers_set)
    layer.training = module.training
    for name, value in vars(module).items():  # plain settings (dim, num_heads, mlp_ratio, ...) it lacks
        if not name.startswith("_") and name not in vars(layer) and isinstance(value, (bool, int, float, str, tuple)):
            object.__setattr__(layer, name, value)
    return layer


class SelfAttention2d(_AttnsrLayer):
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
                 bias=True, backend="auto"):
        super().__init__(backend)
        self._configure(in_channels, out_channels, heads, patch_size, kernel_size, scale)
        out_channels = self.out_channels
        self.qkv = nn.Conv2d(in_channels, 3 * out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.out = nn.Conv2d(out_channels, in_channels, 1, bias=bias)
        for kind in ("weight", "bias"):
            self.checkpoint_aliases[f"qkv.{kind}"] = [f"conv_{n}.{kind}" for n in "qkv"]
            self.checkpoint_aliases[f"out.{kind}"] = [f"conv_out.{kind}"]

    def _configure(self, in_channels, out_channels, heads, patch_size, kernel_size, scale):
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

    @classmethod
    def from_convs(cls, conv_q: nn.Conv2d, conv_k: nn.Conv2d, conv_v: nn.Conv2d, conv_out: nn.Conv2d, *,
                   backend="auto") -> "SelfAttention2d":
        """The layer computed with the document block's own four convolutions (heads=1, patch_size=1).

        The convolutions are adopted, not copied: the layer holds the same modules and Parameter
        objects (an optimizer built on them keeps training them; ``requires_grad`` flags stay), under
        the document's names ``conv_q``, ``conv_k``, ``conv_v``, ``conv_out``, so the state_dict keys
        are the block's. The fused q, k, v convolution's weight is their concatenation, taken in each
        forward (differentiable; nothing is stored). The convolutions must be k×k, stride 1, padding
        k//2 (q, k, v: C → C') and 1×1 (out: C' → C); :func:`attnsr.swap_attention` checks that.
        """
        layer = cls._blank(backend)
        layer._configure(conv_q.in_channels, conv_q.out_channels, 1, 1, conv_q.kernel_size[0], None)
        layer.conv_q, layer.conv_k, layer.conv_v, layer.conv_out = conv_q, conv_k, conv_v, conv_out
        return layer

    def qkv_conv(self):
        """(weight (3·out_channels, in_channels, k, k), bias or None) of the fused q, k, v convolution."""
        if "qkv" in self._modules:
            return self.qkv.weight, self.qkv.bias
        convs = (self.conv_q, self.conv_k, self.conv_v)
        bias = None if convs[0].bias is None else torch.cat([c.bias for c in convs])
        return torch.cat([c.weight for c in convs]), bias

    def forward(self, x):
        weight, bias = self.qkv_conv()
        qkv = F.conv2d(x, weight, bias, padding=self.kernel_size // 2)
        a = backends.image_attention_qkv(qkv, heads=self.heads, patch_size=self.patch_size, scale=self.scale,
                                         backend=self.backend)
        out = self.out if "out" in self._modules else self.conv_out
        return x + out(a)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, heads={self.heads}, patch_size={self.patch_size}, "
                f"kernel_size={self.kernel_size}, scale={self.scale:.4g}, backend={self.backend!r}")


def _mlp_weights(fc1: nn.Module, fc2: nn.Module):
    """The 1×1 convs (or Linear layers) of a channel MLP as matrices: w1 (C//r, C), b1, w2 (C, C//r), b2."""
    return fc1.weight.flatten(1), fc1.bias, fc2.weight.flatten(1), fc2.bias


def _check_act(act) -> None:
    if act not in ("relu", "gelu", "silu"):
        raise ValueError(f"ChannelAttention: act must be 'relu', 'gelu' or 'silu', got {act!r}")


def _check_pool(pool) -> None:
    if pool not in ("avg", "avgmax"):
        raise ValueError(f"ChannelAttention: pool must be 'avg' or 'avgmax', got {pool!r}")


def _mlp_dims(layer: nn.Module):
    """(in, out) features of a 1×1 Conv2d or a Linear."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


class ChannelAttention(_AttnsrLayer):
    """Channel attention (SE / RCAN; CBAM's with ``pool="avgmax"``): y = x · sigmoid(mlp(pool x)).

    mlp = 1×1 conv C → hidden, ReLU, 1×1 conv → C (``fc1``, ``fc2``), the layout of RCAN's
    ``conv_du``; hidden = max(1, C // reduction) unless given. ``pool="avg"``: global average
    pooling; ``"avgmax"``: mlp(avg) + mlp(max). ``act``: the MLP's hidden activation, "relu" (SE,
    RCAN, CBAM), "gelu" (nn.GELU's erf form) or "silu" (SE blocks of OmniSR, MixDehazeNet,
    EfficientNet).

    x: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels, reduction=16, *, pool="avg", bias=True, hidden=None, act="relu", backend="auto"):
        super().__init__(backend)
        _check_pool(pool)
        _check_act(act)
        hidden = max(1, channels // reduction) if hidden is None else hidden
        self.channels, self.reduction, self.pool, self.act = channels, reduction, pool, act
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bias)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bias)

    @classmethod
    def from_mlp(cls, fc1: nn.Module, fc2: nn.Module, *, pool="avg", act="relu",
                 backend="auto") -> "ChannelAttention":
        """The layer computed with an existing MLP's own layers: ``fc1`` (C → hidden) and ``fc2``
        (hidden → C), each a 1×1 Conv2d or a Linear with matching biases.

        The layers are adopted, not copied: the same modules and Parameter objects (an optimizer
        built on them keeps training them; ``requires_grad`` flags stay), registered as ``fc1`` and
        ``fc2`` with the shapes they have (a Linear's weight stays (out, in)).
        """
        channels, hidden = _mlp_dims(fc1)
        layer = cls._blank(backend)
        _check_pool(pool)
        _check_act(act)
        layer.channels, layer.reduction, layer.pool, layer.act = channels, max(1, channels // hidden), pool, act
        layer.fc1, layer.fc2 = fc1, fc2
        return layer

    def forward(self, x):
        return backends.channel_gate(x, *_mlp_weights(self.fc1, self.fc2), pool=self.pool, act=self.act,
                                     backend=self.backend)

    def extra_repr(self):
        act = "" if self.act == "relu" else f", act={self.act!r}"
        return f"{self.channels}, reduction={self.reduction}, pool={self.pool!r}{act}, backend={self.backend!r}"


class SpatialAttention(_AttnsrLayer):
    """Spatial attention: y = x · sigmoid(conv(·)), one gate per pixel shared by all channels.

    ``mode="pool"`` (CBAM): conv k×k over [mean over channels, max over channels], 2 → 1 channels,
    no bias by default (``bias=True`` adds one); fused on the triton backend.
    ``mode="conv"`` (the super-resolution document): Conv2d(channels, 1, k) with bias over the
    features themselves. That is a full convolution, computed by PyTorch (cuDNN) on every backend.

    x: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, kernel_size=7, *, mode="pool", channels=None, bias=None, backend="auto"):
        super().__init__(backend)
        if kernel_size % 2 != 1:
            raise ValueError(f"SpatialAttention: kernel_size must be odd to keep H×W, got {kernel_size}")
        if mode == "pool":
            in_channels = 2
            bias = False if bias is None else bias
        elif mode == "conv":
            if channels is None:
                raise ValueError("SpatialAttention: mode='conv' needs channels= (the features' channel count)")
            in_channels = channels
            bias = True if bias is None else bias
        else:
            raise ValueError(f"SpatialAttention: mode must be 'pool' or 'conv', got {mode!r}")
        self.kernel_size, self.mode = kernel_size, mode
        self.conv = nn.Conv2d(in_channels, 1, kernel_size, padding=kernel_size // 2, bias=bias)

    def forward(self, x):
        if self.mode == "conv":
            (x,) = backends.autocast_inputs(x)  # the gates' autocast rule: the output in the autocast dtype
            return x * torch.sigmoid(self.conv(x))
        return backends.spatial_gate(x, self.conv.weight, self.conv.bias, backend=self.backend)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, mode={self.mode!r}, backend={self.backend!r}"


class CBAM(_AttnsrLayer):
    """CBAM: channel attention (avg + max pooling) then spatial attention (pool mode).

    On the triton backend both gates run fused: the channel-gated map is never written to memory.
    Parameters: ``channel.fc1``, ``channel.fc2``, ``spatial.conv``.

    x: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels, reduction=16, kernel_size=7, *, backend="auto"):
        super().__init__(backend)
        self.channel = ChannelAttention(channels, reduction, pool="avgmax", backend=backend)
        self.spatial = SpatialAttention(kernel_size, mode="pool", backend=backend)

    def forward(self, x):
        conv = self.spatial.conv
        return backends.cbam_gate(x, *_mlp_weights(self.channel.fc1, self.channel.fc2), conv.weight, conv.bias,
                                  pool="avgmax", backend=self.backend)

    def extra_repr(self):
        return f"backend={self.backend!r}"


class LayerAttention(_AttnsrLayer):
    """Layer attention: a softmax-weighted sum of L feature maps, weights from their pooled features.

    w = softmax(mlp(cat_l avg_hw f_l)) ∈ R^L per sample (the super-resolution document's
    w = softmax(MLP(AvgPool(f)))), mlp = Linear(L·C → hidden), ReLU, Linear(hidden → L) with
    hidden = max(L, L·C // reduction); y = Σ_l w_l · f_l, fused on the triton backend (one read of
    each map, one write).

    features: a sequence of L maps (B, C, H, W) or one (L, B, C, H, W) tensor -> (B, C, H, W).
    """

    def __init__(self, num_layers, channels, reduction=16, *, backend="auto"):
        super().__init__(backend)
        hidden = max(num_layers, num_layers * channels // reduction)
        self.num_layers, self.channels = num_layers, channels
        self.fc1 = nn.Linear(num_layers * channels, hidden)
        self.fc2 = nn.Linear(hidden, num_layers)

    def layer_weights(self, features):
        """(B, L) softmax weights of the L maps."""
        pooled = torch.cat([f.mean((2, 3)) for f in features], dim=1)  # (B, L·C)
        return torch.softmax(self.fc2(torch.relu(self.fc1(pooled))), dim=1)

    def forward(self, features):
        if len(features) != self.num_layers:
            raise ValueError(
                f"LayerAttention: got {len(features)} feature maps; expected num_layers = {self.num_layers}"
            )
        weights = self.layer_weights(features)
        return backends.layer_fusion(features, weights.to(features[0].dtype), backend=self.backend)

    def extra_repr(self):
        return f"{self.num_layers}, {self.channels}, backend={self.backend!r}"


class TransposedAttention(_AttnsrLayer):
    """Restormer's multi-Dconv head transposed attention (MDTA): attention across channels.

    ``qkv`` (1×1 conv C → 3C) then ``qkv_dwconv`` (depthwise 3×3 on 3C), q, k, v = its 3 chunks;
    per head (``num_heads``, d = C / num_heads channels each) softmax(τ · q̂ k̂ᵀ) v with q̂, k̂ the
    channels L2-normalised over the pixels and τ the learned ``temperature`` (num_heads, 1, 1);
    then ``project_out`` (1×1 conv C → C). The names are Restormer's, so its checkpoints load.
    The triton backend runs the attention as one fused op (kernels.transposed_attention).

    x: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, dim, num_heads, bias=False, *, backend="auto"):
        super().__init__(backend)
        if dim % num_heads:
            raise ValueError(f"TransposedAttention: dim = {dim} does not split into num_heads = {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    @classmethod
    def from_module(cls, module: nn.Module, *, backend="auto") -> "TransposedAttention":
        """The layer computed with a Restormer ``Attention``'s own children and temperature (adopted,
        not copied: the same Parameter objects, so an optimizer built on them keeps training them)."""
        layer = cls._blank(backend)
        layer.dim, layer.num_heads = module.project_out.in_channels, module.num_heads
        layer.temperature = module.temperature
        layer.qkv, layer.qkv_dwconv, layer.project_out = module.qkv, module.qkv_dwconv, module.project_out
        return layer

    def forward(self, x):
        qkv = self.qkv_dwconv(self.qkv(x))
        out = backends.transposed_attention_qkv(qkv, self.temperature, heads=self.num_heads, backend=self.backend)
        return self.project_out(out)

    def extra_repr(self):
        return f"{self.dim}, num_heads={self.num_heads}, backend={self.backend!r}"


def adaptive_interaction(attended, conv, attended_gate, conv_gate):
    """DAT's adaptive interaction (AIM) of two (B, C, H, W) branches: each is multiplied by the
    sigmoid of a map the other branch's module computes from it (``attended_gate(conv)`` gates the
    attention branch, ``conv_gate(attended)`` the convolution branch: one a channel map (B, C, 1, 1),
    the other a spatial map (B, 1, H, W)), and the two are summed -> (B, C, H, W)."""
    return attended * torch.sigmoid(attended_gate(conv)) + conv * torch.sigmoid(conv_gate(attended))


class AdaptiveTransposedAttention(_AttnsrLayer):
    """DAT's adaptive channel self-attention (``Adaptive_Channel_Attention``), ``forward(x, H, W)``
    on a (B, H·W, C) sequence -> (B, H·W, C).

    q, k, v from one Linear C → 3C (``qkv``); per head (``num_heads``, d = C / num_heads channels)
    the transposed attention softmax(τ · q̂ k̂ᵀ) v of :class:`TransposedAttention` (q̂, k̂: each
    channel L2-normalised over the H·W tokens; τ the learned ``temperature`` (num_heads, 1, 1)),
    fused on the triton backend (kernels.transposed_attention: the qkv projection read in place as a
    (B, 3C, H, W) map with channels innermost, no copy). Beside it a convolution branch ``dwconv``
    (a depthwise 3×3 conv, BatchNorm, GELU) of the values as a (B, C, H, W) map; the adaptive
    interaction (AIM, :func:`adaptive_interaction`) gates the attention branch by
    sigmoid(``spatial_interaction``(conv branch)) and the conv branch by
    sigmoid(``channel_interaction``(attention branch)); their sum goes through ``proj``. The
    convolutions and the AIM run in PyTorch. Attention dropout is not fused (``attn_drop`` must be 0).

    Built by :func:`attnsr.swap_attention` from the module, whose children and temperature it adopts
    (the same Parameter objects and state_dict keys).
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("AdaptiveTransposedAttention is built from DAT's Adaptive_Channel_Attention: "
                        "AdaptiveTransposedAttention.from_module(module)")

    @classmethod
    def from_module(cls, module: nn.Module, *, backend="auto") -> "AdaptiveTransposedAttention":
        layer = cls._blank(backend)
        layer.dim = module.qkv.in_features
        return adopt(layer, module)

    def forward(self, x, H, W):
        b, length, c = x.shape
        if length != H * W or c != self.dim:
            raise ValueError(f"{type(self).__name__}: x is {tuple(x.shape)} with H, W = {H}, {W}; expected "
                             f"(B, H·W, C) = (B, {H * W}, {self.dim})")
        qkv = self.qkv(x).view(b, H, W, 3 * c).permute(0, 3, 1, 2)  # (B, 3C, H, W), channels innermost
        attended = backends.transposed_attention_qkv(qkv, self.temperature, heads=self.num_heads,
                                                     backend=self.backend)
        conv = self.dwconv(qkv[:, 2 * c:])
        y = adaptive_interaction(attended, conv, self.spatial_interaction, self.channel_interaction)
        return self.proj_drop(self.proj(y.permute(0, 2, 3, 1).reshape(b, length, c)))

    def extra_repr(self):
        return f"{self.dim}, num_heads={self.num_heads}, backend={self.backend!r}"
