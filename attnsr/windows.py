"""Swin window attention layers (W-MSA / SW-MSA) and the transformer blocks around them, fused.

:class:`WindowAttention` is SwinIR's ``WindowAttention`` with the same parameters, buffer and
state_dict keys (``qkv``, ``proj``, ``relative_position_bias_table``, ``relative_position_index``)
and the same ``forward(x, mask=None)`` on windows already cut, (nW·B, N, C); a SwinIR checkpoint
loads into it as it is. :class:`WindowAttentionRPI` takes HAT's and DRCT-style
``forward(x, rpi, mask=None)`` (the index passed in by the caller), :class:`WindowAttentionQKV`
ATD's ``forward(qkv, rpi, mask=None)`` (the qkv projection done by the caller) and
:class:`WindowAttentionV2` Swin V2's cosine attention with its continuous position bias (Swin2SR's).

:class:`SwinBlock` (SwinIR's / DRCT's ``SwinTransformerBlock``, ``forward(x, x_size)``) and
:class:`HybridAttentionBlock` (HAT's ``HAB``, ``forward(x, x_size, rpi_sa, attn_mask)``) run the
whole block on the un-partitioned map: the cyclic shift, the window partition and its reverse are
index arithmetic in the kernel, never a copy. They are built by :func:`attnsr.swap_attention` from
the model's own block, whose children (``norm1``, ``attn``, ``mlp``, ...), buffers and plain
settings (``dim``, ``num_heads``, ...) they adopt: the state_dict keys, the Parameter objects and
their flags stay the model's (its methods, such as SwinIR's ``flops``, do not carry over). :class:`SwinV2Block`
is Swin2SR's post-norm block.

:class:`RectWindowAttention` (RGT's ``L_SA``) and :class:`AdaptiveRectWindowAttention` (DAT's
``Adaptive_Spatial_Attention``) are rectangle-window attentions: half of the channels in Wh×Ww
windows, half in Ww×Wh, each half with its dynamic position bias, on a map zero-padded to whole
windows, shifted or not; the fused window op runs each half. :class:`RectWindowBlock` is CRAFT's
block around the same two-half attention (``SRWAB``: no padding, shifted halves without a mask,
the position MLPs' offsets and index passed in by the caller).

Attention dropout is not fused: these layers exist only with ``attn_drop`` = 0 (SwinIR's, HAT's
and DRCT's default); output dropout (``proj_drop``) and stochastic depth are kept as modules.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnsr import backends
from attnsr.layers import _AttnsrLayer, adaptive_interaction, adopt


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def standard_index(window_size, device=None) -> torch.Tensor:
    """Swin's relative position index of a window, the one the kernel computes from coordinates."""
    from attnsr.kernels.reference import relative_position_index  # imports triton: only when used

    return relative_position_index(_pair(window_size)).to(device)


def is_standard_index(index, window_size) -> bool:
    """Whether ``index`` (a module's or a caller's relative position index) is Swin's for the window."""
    if not isinstance(index, torch.Tensor):
        return False
    want = standard_index(window_size, index.device)
    return index.shape == want.shape and torch.equal(index.to(want.dtype), want)


class WindowAttention(_AttnsrLayer):
    """SwinIR's window attention with a relative position bias, fused on the triton backend.

    dim: channels C; window_size: Wh or (Wh, Ww); num_heads: heads (head dim C/heads);
    qk_scale: the softmax scale, (C/heads)^−½ by default. ``forward(x, mask=None)``: x (nW·B, N, C)
    windows of N = Wh·Ww tokens, mask an additive (nW, N, N) mask (window i takes slice i mod nW, as
    in SwinIR) or None -> (nW·B, N, C). ``forward_map`` attends over a whole (B, H, W, C) map
    (shifted or not) without cutting it into windows.
    """

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0, *,
                 backend="auto"):
        super().__init__(backend)
        if attn_drop:
            raise ValueError(f"{type(self).__name__}: attn_drop = {attn_drop}; attention dropout is not fused, "
                             "expected 0.0 (SwinIR's default)")
        if dim % num_heads:
            raise ValueError(f"{type(self).__name__}: num_heads = {num_heads} does not divide dim = {dim}")
        wh, ww = _pair(window_size)
        self._configure(dim, (wh, ww), num_heads, qk_scale)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", standard_index((wh, ww)))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _configure(self, dim, window_size, num_heads, qk_scale):
        self.dim, self.window_size, self.num_heads = dim, tuple(window_size), num_heads
        self.scale = float(qk_scale or (dim // num_heads) ** -0.5)

    @classmethod
    def from_module(cls, module: nn.Module, *, backend="auto"):
        """The layer computing ``module`` (a SwinIR-, HAT- or ATD-style window attention, checked by
        :func:`attnsr.swap_attention`) with the module's own children, table and buffers."""
        layer = cls._blank(backend)
        layer._configure(module.dim, _pair(module.window_size), module.num_heads, module.scale)
        return adopt(layer, module)

    def attend(self, qkv, shift_size=0, mask=None):
        """Attention of a (B, H, W, 3C) qkv map, windows of ``window_size`` shifted by ``shift_size``
        (Swin's −100 mask when shifted and ``mask`` is None) -> (B, H, W, C), before ``proj``."""
        return backends.window_attention_qkv(qkv, window_size=self.window_size, shift_size=shift_size,
                                             heads=self.num_heads, bias_table=self.relative_position_bias_table,
                                             mask=mask, scale=self.scale, backend=self.backend)

    def project(self, x):
        return self.proj_drop(self.proj(x)) if "proj_drop" in self._modules else self.proj(x)

    def forward_map(self, x, shift_size=0, mask=None):
        """(B, H, W, C) map -> (B, H, W, C): qkv, windowed attention, proj."""
        return self.project(self.attend(self.qkv(x), shift_size, mask))

    def _windows(self, qkv, mask):
        b_, n, c3 = qkv.shape
        wh, ww = self.window_size
        if n != wh * ww:
            raise ValueError(f"{type(self).__name__}: got windows of {n} tokens; expected Wh·Ww = {wh * ww}")
        out = self.attend(qkv.view(b_, wh, ww, c3), 0, mask)
        return self.project(out.view(b_, n, c3 // 3))

    def forward(self, x, mask=None):
        return self._windows(self.qkv(x), mask)

    def extra_repr(self):
        return (f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
                f"backend={self.backend!r}")


def check_index(layer: nn.Module, rpi: torch.Tensor) -> None:
    """Refuse a relative position index other than Swin's (the kernel computes Swin's). Checked
    once per index tensor and version (a comparison, one device sync), not under torch.compile."""
    if torch.compiler.is_compiling():
        return
    key = (rpi.data_ptr(), rpi.device, rpi._version, tuple(rpi.shape))
    if getattr(layer, "_checked_index", None) == key:
        return
    if not is_standard_index(rpi, layer.window_size):
        raise ValueError(f"{type(layer).__name__}: the relative position index passed in is not Swin's for a "
                         f"{layer.window_size} window (shape {tuple(rpi.shape)}); the fused kernel computes Swin's")
    layer._checked_index = key


class WindowAttentionRPI(WindowAttention):
    """:class:`WindowAttention` with HAT's signature ``forward(x, rpi, mask=None)``: the relative
    position index comes from the caller (it must be Swin's; checked once)."""

    def forward(self, x, rpi, mask=None):
        check_index(self, rpi)
        return self._windows(self.qkv(x), mask)


class WindowAttentionQKV(WindowAttention):
    """ATD's window attention, ``forward(qkv, rpi, mask=None)``: qkv (nW·B, N, 3C) projected by
    the caller; this layer holds the table and ``proj`` only."""

    def forward(self, qkv, rpi, mask=None):
        check_index(self, rpi)
        return self._windows(qkv, mask)


def cosine_window_attention(layer, qkv, logit_scale, logit_max, cpb_mlp, coords_table, shift_size, mask):
    """Swin V2's cosine window attention of a (B, H, W, 3C) qkv map on ``layer``'s windows, heads and
    backend: q̂·τ against k̂ (unit-normalised per head, τ = exp(min(logit_scale, logit_max))) with scale
    1 and the bias table 16·sigmoid(cpb_mlp(coords_table)) -> (B, H, W, C)."""
    heads = layer.num_heads
    c = qkv.shape[-1] // 3
    q, k, v = qkv.split(c, dim=-1)
    tau = torch.clamp(logit_scale, max=logit_max).exp().view(heads, 1)
    q = (F.normalize(q.unflatten(-1, (heads, c // heads)), dim=-1) * tau).flatten(-2)
    k = F.normalize(k.unflatten(-1, (heads, c // heads)), dim=-1).flatten(-2)
    table = 16 * torch.sigmoid(cpb_mlp(coords_table).view(-1, heads))
    return backends.window_attention(q, k, v, window_size=layer.window_size, shift_size=shift_size, heads=heads,
                                     bias_table=table.to(q.dtype), mask=mask, scale=1.0, backend=layer.backend)


class WindowAttentionV2(WindowAttention):
    """Swin V2's window attention (Swin2SR's), ``forward(x, mask=None)``: cosine attention,
    softmax(τ_h · q̂ k̂ᵀ + 16·sigmoid(B̂) + mask) v with q̂, k̂ the unit-normalised queries and keys of
    each head, τ_h = exp(min(logit_scale_h, log 100)) and B̂ = cpb_mlp(relative_coords_table)
    gathered by Swin's index: the continuous position bias.

    Fused as window attention with scale 1, q̂·τ_h as queries and 16·sigmoid(cpb_mlp(·)) as the bias
    table (its gradient reaches cpb_mlp through autograd); the normalised q̂, k̂ are formed in
    PyTorch (two (B, N, C) tensors), the N×N scores never are. Built by :func:`attnsr.swap_attention`
    from a Swin V2 module, whose parameters (``qkv`` without bias, ``q_bias``, ``v_bias``,
    ``logit_scale``, ``cpb_mlp``, ``proj``) and buffers it adopts.
    """

    LOGIT_MAX = float(torch.log(torch.tensor(1.0 / 0.01)))  # Swin V2's clamp, the float32 value it uses

    def __init__(self, *args, **kwargs):
        raise TypeError("WindowAttentionV2 is built from a Swin V2 module: WindowAttentionV2.from_module(module)")

    @classmethod
    def from_module(cls, module: nn.Module, *, backend="auto"):
        layer = cls._blank(backend)
        layer._configure(module.dim, _pair(module.window_size), module.num_heads, 1.0)
        return adopt(layer, module)

    def _project_qkv(self, x):
        bias = None
        if self._parameters.get("q_bias") is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        return F.linear(x, self.qkv.weight, bias)

    def attend(self, qkv, shift_size=0, mask=None):
        return cosine_window_attention(self, qkv, self.logit_scale, self.LOGIT_MAX, self.cpb_mlp,
                                       self.relative_coords_table, shift_size, mask)

    def forward_map(self, x, shift_size=0, mask=None):
        return self.project(self.attend(self._project_qkv(x), shift_size, mask))

    def forward(self, x, mask=None):
        return self._windows(self._project_qkv(x), mask)


class WindowAttentionV2Map(WindowAttention):
    """GRL's window attention, ``forward(qkv, x_size, table, index, mask)``: Swin V2's cosine
    attention (as :class:`WindowAttentionV2`) on a whole (B, H·W, 3C) qkv map, windows shifted by
    ``shift_size``, the continuous position bias's coordinates ``table``, Swin's ``index`` and the
    (nW, N, N) ``mask`` (or None: no mask, even when shifted) passed in by the caller; the logit scale
    and the bias MLP live in the child ``attn_transform`` -> (B, H·W, C). Roll, partition and reverse
    are index arithmetic in the kernel. Built by :func:`attnsr.swap_attention` from the module, whose
    children it adopts.
    """

    LOGIT_MAX = math.log(1.0 / 0.01)  # GRL's clamp of the logit scale

    def __init__(self, *args, **kwargs):
        raise TypeError("WindowAttentionV2Map is built from GRL's WindowAttention: "
                        "WindowAttentionV2Map.from_module(module)")

    @classmethod
    def from_module(cls, module: nn.Module, *, backend="auto"):
        layer = cls._blank(backend)
        layer._configure(module.num_heads, _pair(module.window_size), module.num_heads, 1.0)
        layer.shift_size = module.shift_size
        return adopt(layer, module)

    def forward(self, qkv, x_size, table, index, mask):
        height, width = x_size
        b, length, c3 = qkv.shape
        c = c3 // 3
        check_index(self, index)
        transform = self.attn_transform
        out = cosine_window_attention(self, qkv.view(b, height, width, c3), transform.logit_scale, self.LOGIT_MAX,
                                      transform.cpb_mlp, table, self.shift_size, False if mask is None else mask)
        return out.view(b, length, c)

    def extra_repr(self):
        return (f"window_size={self.window_size}, shift_size={self.shift_size}, num_heads={self.num_heads}, "
                f"backend={self.backend!r}")


class WindowAttentionToQKV(WindowAttention):
    """Uformer's window attention, ``forward(x, attn_kv=None, mask=None)`` on windows already cut,
    (nW·B, N, C): queries from ``qkv.to_q`` (Linear C → C), keys and values from ``qkv.to_kv``
    (Linear C → 2C) of x, or of ``attn_kv`` (N, C) shared by every window when given; Swin's bias
    table and index; ``mask`` (nW, N, N) additive as in :class:`WindowAttention`. The three
    projections are read where they lie (k and v as views of one (nW·B, N, 2C) tensor): no ``cat``.
    Built by :func:`attnsr.swap_attention` from the module, whose children and parameters it adopts.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("WindowAttentionToQKV is built from Uformer's WindowAttention: "
                        "WindowAttentionToQKV.from_module(module)")

    @classmethod
    def from_module(cls, module: nn.Module, *, backend="auto"):
        layer = cls._blank(backend)
        layer._configure(module.dim, _pair(module.win_size), module.num_heads, module.scale)
        return adopt(layer, module)

    def forward(self, x, attn_kv=None, mask=None):
        b_, n, c = x.shape
        wh, ww = self.window_size
        if n != wh * ww:
            raise ValueError(f"{type(self).__name__}: got windows of {n} tokens; expected Wh·Ww = {wh * ww}")
        if attn_kv is not None and tuple(attn_kv.shape) != (n, c):
            raise ValueError(f"{type(self).__name__}: attn_kv is {tuple(attn_kv.shape)}; the fused kernel takes "
                             f"keys from windows of the queries' size, expected ({n}, {c})")
        kv = self.qkv.to_kv(x if attn_kv is None else attn_kv.expand(b_, n, c))
        q, (k, v) = self.qkv.to_q(x), kv.split(c, dim=-1)
        out = backends.window_attention(*(t.view(b_, wh, ww, c) for t in (q, k, v)), window_size=self.window_size,
                                        heads=self.num_heads, bias_table=self.relative_position_bias_table, mask=mask,
                                        scale=self.scale, backend=self.backend)
        return self.project(out.view(b_, n, c))


class WindowAttentionMap(WindowAttention):
    """SCUNet's ``WMSA``, ``forward(x)`` on a whole (B, H, W, C) map -> (B, H, W, C_out): q, k, v from
    one Linear C → 3C (``embedding_layer``), windows of ``window_size`` tokens on a side, shifted by
    half a window when ``type`` is "SW", a relative position bias (``relative_position_params``,
    (heads, 2W−1, 2W−1): the Swin table laid out head-first), −inf between tokens of a shifted
    window that came from different regions, and the output Linear C → C_out (``linear``).

    Fused as window attention with the table read through a (2W−1)², heads view of the module's
    parameter (its gradient flows back through the view) and SCUNet's −inf mask passed as an
    explicit (nW, N, N) mask, built once per map size and device. Built by
    :func:`attnsr.swap_attention` from the module, whose children and parameter it adopts.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("WindowAttentionMap is built from SCUNet's WMSA: WindowAttentionMap.from_module(module)")

    @classmethod
    def from_module(cls, module: nn.Module, *, backend="auto"):
        layer = cls._blank(backend)
        layer._configure(module.input_dim, _pair(module.window_size), module.n_heads, module.scale)
        layer._masks = {}
        return adopt(layer, module)

    @property
    def shift(self) -> int:
        return self.window_size[0] // 2 if self.type != "W" else 0

    def table(self):
        """The bias as Swin's ((2Wh−1)(2Ww−1), heads) table: a view of ``relative_position_params``."""
        return self.relative_position_params.permute(1, 2, 0).reshape(-1, self.num_heads)

    def _mask(self, height: int, width: int, x: torch.Tensor):
        """SCUNet's shifted-window mask, (nW, N, N): −inf between regions, 0 elsewhere; None unshifted."""
        if not self.shift:
            return False  # no mask at all (not Swin's −100)
        key = (height, width, x.device, x.dtype)
        if key not in self._masks:
            from attnsr.kernels.reference import swin_shift_mask

            regions = swin_shift_mask(height, width, self.window_size, self.shift, device=x.device)
            self._masks = {key: torch.where(regions != 0, float("-inf"), 0.0).to(x.dtype)}  # the last size only
        return self._masks[key]

    def attend(self, qkv, shift_size=0, mask=None):
        return backends.window_attention_qkv(qkv, window_size=self.window_size, shift_size=shift_size,
                                             heads=self.num_heads, bias_table=self.table(), mask=mask,
                                             scale=self.scale, backend=self.backend)

    def forward(self, x):
        _, height, width, _ = x.shape
        return self.linear(self.attend(self.embedding_layer(x), self.shift, self._mask(height, width, x)))

    def extra_repr(self):
        return (f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, type={self.type!r}, "
                f"backend={self.backend!r}")


class SwinBlock(_AttnsrLayer):
    """SwinIR's ``SwinTransformerBlock`` on the un-partitioned map: x (B, H·W, C), x_size (H, W).

    x + drop_path(proj(SW-MSA(norm1 x))), then + drop_path(mlp(norm2 ·)); the shifted windows'
    mask is Swin's, computed in the kernel for any x_size (as SwinIR's ``calculate_mask`` does).
    """

    @classmethod
    def from_module(cls, module: nn.Module, attn: WindowAttention, *, backend="auto"):
        layer = cls._blank(backend)
        adopt(layer, module)
        layer._modules["attn"] = attn
        layer.window_size, layer.shift_size = module.window_size, module.shift_size
        layer.input_resolution = getattr(module, "input_resolution", None)
        return layer

    def forward(self, x, x_size):
        h, w = x_size
        b, length, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        y = self.attn.forward_map(y, self.shift_size).view(b, length, c)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self):
        return f"window_size={self.window_size}, shift_size={self.shift_size}, backend={self.backend!r}"


class SwinV2Block(SwinBlock):
    """Swin V2's block (Swin2SR's ``SwinTransformerBlock``), ``forward(x, x_size)``, post-norm:
    x + drop_path(norm1(proj(SW-MSA(x)))), then + drop_path(norm2(mlp(·))); attention
    :class:`WindowAttentionV2`, Swin's mask computed in the kernel."""

    def forward(self, x, x_size):
        h, w = x_size
        b, length, c = x.shape
        y = self.attn.forward_map(x.view(b, h, w, c), self.shift_size).view(b, length, c)
        x = x + self.drop_path(self.norm1(y))
        return x + self.drop_path(self.norm2(self.mlp(x)))


class HybridAttentionBlock(SwinBlock):
    """HAT's ``HAB`` on the un-partitioned map: ``forward(x, x_size, rpi_sa, attn_mask)``.

    x + drop_path(proj(SW-MSA(norm1 x))) + conv_scale · conv_block(norm1 x), then the MLP; a shifted
    block applies the (nW, N, N) ``attn_mask`` it is given, as HAT does, broadcast over the batch.
    """

    @classmethod
    def from_module(cls, module: nn.Module, attn: WindowAttention, *, backend="auto"):
        layer = super().from_module(module, attn, backend=backend)
        layer.conv_scale = module.conv_scale
        return layer

    def forward(self, x, x_size, rpi_sa, attn_mask):
        h, w = x_size
        b, length, c = x.shape
        check_index(self.attn, rpi_sa)
        y = self.norm1(x).view(b, h, w, c)
        conv = self.conv_block(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, length, c)
        # HAT applies the mask it is given when shifted, none otherwise (False: not even Swin's)
        mask = (False if attn_mask is None else attn_mask) if self.shift_size > 0 else None
        a = self.attn.forward_map(y, self.shift_size, mask).view(b, length, c)
        x = x + self.drop_path(a) + conv * self.conv_scale
        return x + self.drop_path(self.mlp(self.norm2(x)))


class RectWindowAttention(_AttnsrLayer):
    """RGT's rectangle-window self-attention (``L_SA``), ``forward(x, H, W)`` on a (B, H·W, C)
    sequence -> (B, H·W, C), the attention fused on the triton backend.

    q, k, v come from one Linear C → 3C (``qkv``) and their channels split in two halves, each
    attending with its own heads (``attns[i].num_heads``, scale ``attns[i].scale``) within its own
    rectangles: the first half in Wh×Ww windows (``split_size`` = (Wh, Ww)), the second in Ww×Wh
    windows (the rectangle turned). Before the partition the map is zero-padded at the bottom and
    the right to a multiple of max(Wh, Ww), with no mask: a padded key has q·k = 0 and v = 0 and
    scores its position bias alone; padded queries are cropped. A shifted layer (one that holds the
    masks ``attn_mask_0`` and ``attn_mask_1``) rolls the first half by ``shift_size`` = (sh, sw)
    and the second by (sw, sh) on the padded map and masks, as Swin does, the token pairs that the
    roll brought together (−100): at the training resolution (the padded map ``patches_resolution``
    on a side) with its own mask buffers, elsewhere with Swin's mask computed in the kernel (what
    the module computes there). The relative position bias of each half is its dynamic position
    MLP ``attns[i].pos`` over the buffer ``attns[i].rpe_biases``, a ((2Wh−1)(2Ww−1), heads) table
    computed by PyTorch in each call (a small MLP; its gradient flows back through autograd) and
    gathered by Swin's index in the kernel. The two halves' outputs are put side by side, the
    values' depthwise convolution ``get_v`` (on the unpadded map) is added, and ``proj`` applied.

    Fused: one zero-padded copy of q, k, v laid out half by half (each half's q, k and v packed in
    one (B, H', W', 3C/2) map), one window attention per half with the roll and the partition as
    index arithmetic (no N×N scores, no roll), the qkv gradient written as one buffer per half.
    Attention dropout is not fused (``attn_drop`` must be 0). Built by :func:`attnsr.swap_attention`
    from the module, whose children and buffers it adopts (the same state_dict keys).
    """

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is built from a rectangle-window attention module: "
                        f"{type(self).__name__}.from_module(module)")

    @classmethod
    def from_module(cls, module: nn.Module, *, backend="auto"):
        layer = cls._blank(backend)
        layer.dim, layer.num_heads = module.dim, module.num_heads
        layer.split_size, layer.shift_size = tuple(module.split_size), tuple(module.shift_size)
        layer.patches_resolution = module.patches_resolution
        layer._mask_checks = {}
        adopt(layer, module)
        layer.shifted = layer._buffers.get("attn_mask_0") is not None
        return layer

    def half_geometry(self, half: int):
        """(window, shift) of half 0 or 1: ((Wh, Ww), (sh, sw)) and ((Ww, Wh), (sw, sh)); no shift unless shifted."""
        attn = self.attns[half]
        shift = self.shift_size if half == 0 else self.shift_size[::-1]
        return (attn.H_sp, attn.W_sp), (tuple(shift) if self.shifted else (0, 0))

    def _mask(self, half: int, height: int, width: int):
        """The mask of a shifted half on the padded (height, width) map: the layer's own buffer at its
        training resolution, as the module applies it (None when it is Swin's mask, checked once per
        buffer version: the kernel computes that one), elsewhere None (Swin's mask, in the kernel)."""
        if not self.shifted or (height, width) != (self.patches_resolution,) * 2:
            return None
        buffer = self._buffers[f"attn_mask_{half}"]
        if torch.compiler.is_compiling():
            return buffer
        key = (buffer.data_ptr(), buffer.device, buffer.dtype, buffer._version, tuple(buffer.shape))
        known = self._mask_checks.get(half)
        if known is None or known[0] != key:
            from attnsr.kernels.reference import swin_shift_mask

            window, shift = self.half_geometry(half)
            swin = swin_shift_mask(height, width, window, shift, dtype=buffer.dtype, device=buffer.device)
            known = self._mask_checks[half] = (key, swin.shape == buffer.shape and bool(torch.equal(swin, buffer)))
        return None if known[1] else buffer

    def attend(self, qkv, height: int, width: int):
        """The two halves' rectangle-window attention of a (B, H·W, 3C) qkv sequence -> (B, H, W, C)."""
        b, _, c3 = qkv.shape
        half = c3 // 6
        side = max(self.split_size)
        pad_h, pad_w = -height % side, -width % side
        # (2, B, H', W', 3, C/2): each half's q, k, v packed, zero rows at the bottom, zero columns at the right
        halves = qkv.view(b, height, width, 3, 2, half).permute(4, 0, 1, 2, 3, 5)
        halves = F.pad(halves, (0, 0, 0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else halves.contiguous()
        hp, wp = height + pad_h, width + pad_w
        outs = []
        for i, packed in enumerate(halves.unbind(0)):
            attn = self.attns[i]
            window, shift = self.half_geometry(i)
            table = attn.pos(attn.rpe_biases) if attn.position_bias else None
            out = backends.window_attention_qkv(packed.view(b, hp, wp, 3 * half), window_size=window,
                                                shift_size=shift, heads=attn.num_heads, bias_table=table,
                                                mask=self._mask(i, hp, wp), scale=attn.scale, backend=self.backend)
            outs.append(out[:, :height, :width])
        return torch.cat(outs, dim=-1)

    def _check(self, x, height, width):
        b, length, c = x.shape
        if length != height * width or c != self.dim:
            raise ValueError(f"{type(self).__name__}: x is {tuple(x.shape)} with H, W = {height}, {width}; expected "
                             f"(B, H·W, C) = (B, {height * width}, {self.dim})")
        return b, length, c

    def project(self, y):
        return self.proj_drop(self.proj(y)) if "proj_drop" in self._modules else self.proj(y)

    def forward(self, x, H, W):
        b, length, c = self._check(x, H, W)
        qkv = self.qkv(x)
        attended = self.attend(qkv, H, W).view(b, length, c)
        v = qkv.view(b, H, W, 3 * c)[..., 2 * c:].permute(0, 3, 1, 2)  # (B, C, H, W), unpadded
        return self.project(attended + self.get_v(v).permute(0, 2, 3, 1).reshape(b, length, c))

    def extra_repr(self):
        return (f"dim={self.dim}, split_size={self.split_size}, shift_size={self.shift_size if self.shifted else 0}, "
                f"num_heads={self.num_heads}, backend={self.backend!r}")


class AdaptiveRectWindowAttention(RectWindowAttention):
    """DAT's adaptive spatial self-attention (``Adaptive_Spatial_Attention``), ``forward(x, H, W)``:
    the rectangle-window attention of :class:`RectWindowAttention` (two halves of the channels in
    Wh×Ww and Ww×Wh windows, zero padding without a mask, shifted halves, the dynamic position bias),
    fused on the triton backend, beside a convolution branch ``dwconv`` (a depthwise 3×3 conv,
    BatchNorm, GELU) of the values as a (B, C, H, W) map; the adaptive interaction (AIM,
    :func:`attnsr.layers.adaptive_interaction`) gates the attention branch by
    sigmoid(``channel_interaction``(conv branch)) and the conv branch by
    sigmoid(``spatial_interaction``(attention branch)); their sum goes through ``proj``. The
    convolutions and the AIM run in PyTorch.
    """

    def forward(self, x, H, W):
        b, length, c = self._check(x, H, W)
        qkv = self.qkv(x)
        attended = self.attend(qkv, H, W).permute(0, 3, 1, 2)  # (B, C, H, W)
        conv = self.dwconv(qkv.view(b, H, W, 3 * c)[..., 2 * c:].permute(0, 3, 1, 2))
        y = adaptive_interaction(attended, conv, self.channel_interaction, self.spatial_interaction)
        return self.project(y.permute(0, 2, 3, 1).reshape(b, length, c))


class RectWindowBlock(_AttnsrLayer):
    """CRAFT's shifted rectangle-window attention block (``SRWAB``), ``forward(x, x_size, params,
    attn_mask)`` on a (B, H·W, C) sequence -> (B, H·W, C), the attention fused on the triton backend.

    The block: ``norm1``, q, k, v from one Linear C → 3C (``qkv``), the channels split in two halves
    that attend within their own rectangles (the first half in Wh×Ww windows, ``attns[0].H_sp`` ×
    ``attns[0].W_sp``, the second in Ww×Wh windows, each with its heads and scale), the values'
    depthwise convolution ``get_v`` added, ``proj``, the residual, then ``norm2``, ``mlp`` and the
    residual. A shifted block (``shift_size`` (sh, sw) ≠ 0) rolls the first half by (sh, sw) and the
    second by (sw, sh) and, given no mask (CRAFT passes none), masks nothing: tokens that the roll
    brings together from opposite borders attend to each other, as in the module. A mask given per
    half (``attn_mask[i]``, (nW, N, N), window i of an image taking slice i) is added as it is; an
    unshifted block ignores masks, as the module does (``attn_mask`` None: no mask for either half).
    The relative position bias of each half is its dynamic position MLP ``attns[i].pos`` over the
    offsets table the caller passes (``params["biases_h"]``, ``params["biases_v"]``), computed by
    PyTorch in each call and gathered by the index the caller passes (``params["rpi_sa_h"]``,
    ``params["rpi_sa_v"]``), which must be Swin's (checked once per index tensor). H and W must be
    multiples of both window sides (the module partitions without padding; CRAFT pads the image).

    Fused: each half's q, k, v packed in one (B, H, W, 3C/2) map, one window attention per half with
    the roll and the partition as index arithmetic (no N×N scores, no roll). Attention dropout is
    not fused (the module has none). Built by :func:`attnsr.swap_attention` from the block, whose
    children it adopts (the same state_dict keys).
    """

    _HALF_KEYS = (("biases_h", "rpi_sa_h"), ("biases_v", "rpi_sa_v"))

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is built from CRAFT's SRWAB block: "
                        f"{type(self).__name__}.from_module(block)")

    @classmethod
    def from_module(cls, module: nn.Module, *, backend="auto"):
        layer = cls._blank(backend)
        layer.dim = module.dim
        layer.shift_size = tuple(module.shift_size)
        layer._checked_index = {}
        return adopt(layer, module)

    @property
    def shifted(self) -> bool:
        return any(self.shift_size)

    def half_geometry(self, half: int):
        """(window, shift) of half 0 or 1: ((Wh, Ww), (sh, sw)) and ((Ww, Wh), (sw, sh))."""
        attn = self.attns[half]
        shift = self.shift_size if half == 0 else self.shift_size[::-1]
        return (attn.H_sp, attn.W_sp), tuple(shift)

    def _check_index(self, half: int, rpi: torch.Tensor, window) -> None:
        if torch.compiler.is_compiling():
            return
        key = (rpi.data_ptr(), rpi.device, rpi._version, tuple(rpi.shape))
        if self._checked_index.get(half) == key:
            return
        if not is_standard_index(rpi, window):
            raise ValueError(f"{type(self).__name__}: the relative position index of half {half} is not Swin's for a "
                             f"{window} window (shape {tuple(rpi.shape)}); the fused kernel computes Swin's")
        self._checked_index[half] = key

    def attend(self, qkv, height: int, width: int, params, attn_mask):
        """The two halves' rectangle-window attention of a (B, H·W, 3C) qkv sequence -> (B, H, W, C)."""
        b, _, c3 = qkv.shape
        half = c3 // 6
        # (2, B, H, W, 3, C/2) -> each half's q, k, v packed as one (B, H, W, 3C/2) map
        halves = qkv.view(b, height, width, 3, 2, half).permute(4, 0, 1, 2, 3, 5).contiguous()
        outs = []
        for i, packed in enumerate(halves.unbind(0)):
            attn = self.attns[i]
            window, shift = self.half_geometry(i)
            biases, index = (params[k] for k in self._HALF_KEYS[i])
            self._check_index(i, index, window)
            if self.shifted:
                given = None if attn_mask is None else attn_mask[i]
                mask = False if given is None else given  # False: no mask at all, not Swin's
            else:
                mask, shift = None, (0, 0)
            outs.append(backends.window_attention_qkv(packed.view(b, height, width, 3 * half), window_size=window,
                                                      shift_size=shift, heads=attn.num_heads,
                                                      bias_table=attn.pos(biases), mask=mask, scale=attn.scale,
                                                      backend=self.backend))
        return torch.cat(outs, dim=-1)

    def forward(self, x, x_size, params, attn_mask=None):
        height, width = x_size
        b, length, c = x.shape
        if length != height * width or c != self.dim:
            raise ValueError(f"{type(self).__name__}: x is {tuple(x.shape)} with x_size = {tuple(x_size)}; expected "
                             f"(B, H·W, C) = (B, {height * width}, {self.dim})")
        qkv = self.qkv(self.norm1(x))
        attended = self.attend(qkv, height, width, params, attn_mask).view(b, length, c)
        v = qkv.view(b, height, width, 3 * c)[..., 2 * c:].permute(0, 3, 1, 2)  # (B, C, H, W)
        x = x + self.proj(attended + self.get_v(v).permute(0, 2, 3, 1).reshape(b, length, c))
        return x + self.mlp(self.norm2(x))

    def extra_repr(self):
        return (f"dim={self.dim}, windows={[self.half_geometry(i)[0] for i in (0, 1)]}, "
                f"shift_size={self.shift_size}, backend={self.backend!r}")
