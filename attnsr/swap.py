"""swap_attention: make an existing model use attnsr's layers, in place, weights and function kept.

Modules are recognised by structure, never by class name, and every candidate is checked on a
float64 probe input before it is replaced: a module whose output the replacement does not
reproduce is left untouched. Recognised:

- the inpainting document's self-attention block: Conv2d children ``conv_q``, ``conv_k``,
  ``conv_v`` (C → C', k×k, stride 1, padding k//2) and ``conv_out`` (C' → C, 1×1), nothing else
  with parameters; forward x + conv_out(softmax(qᵀk/√C) v) -> :class:`SelfAttention2d`;
- a channel attention (RCAN's CALayer, HAT's, torchvision's SqueezeExcitation, timm's SE modules):
  at most one AdaptiveAvgPool2d(1), 1×1 Conv2d or Linear C → h and h → C, a ReLU and a sigmoid
  (recognised by what they compute), a Sequential child opened up, nothing else with parameters;
  or (Real-CUGAN's SEBlock) the two layers alone, the mean, ReLU and sigmoid called in forward;
  forward x · gate -> :class:`ChannelAttention`;
- a Swin window attention (SwinIR's, HAT's, DRCT's, ATD's) -> :class:`~attnsr.windows.WindowAttention`
  or its RPI / QKV variants by the forward's arity; Swin V2's (Swin2SR's) ->
  :class:`~attnsr.windows.WindowAttentionV2`; SCUNet's WMSA (whole-map windows, a head-first bias
  table, −inf shift mask) -> :class:`~attnsr.windows.WindowAttentionMap`; Uformer's (``to_q`` and
  ``to_kv`` projections) -> :class:`~attnsr.windows.WindowAttentionToQKV`; GRL's (Swin V2 cosine
  attention on a whole qkv map, table, index and mask passed in) ->
  :class:`~attnsr.windows.WindowAttentionV2Map`;
- the blocks around them: SwinIR's / DRCT's SwinTransformerBlock -> :class:`~attnsr.windows.SwinBlock`,
  Swin2SR's -> :class:`~attnsr.windows.SwinV2Block`, HAT's HAB ->
  :class:`~attnsr.windows.HybridAttentionBlock` (roll, partition and reverse gone);
- Restormer's transposed (channel) attention ``Attention`` (MDTA): int ``num_heads``, a
  ``temperature`` (heads, 1, 1), ``qkv`` 1×1 Conv2d C → 3C, ``qkv_dwconv`` depthwise 3×3 on 3C,
  ``project_out`` 1×1 Conv2d C → C, nothing else with parameters -> :class:`~attnsr.layers.TransposedAttention`;
  DAT's ``Adaptive_Channel_Attention`` (the same attention on a Linear qkv projection, a convolution
  branch and the adaptive interaction) -> :class:`~attnsr.layers.AdaptiveTransposedAttention`;
- the rectangle-window attention of RGT (``L_SA``) and DAT (``Adaptive_Spatial_Attention``): two
  halves of the channels in Wh×Ww and Ww×Wh windows, a dynamic position bias MLP each, zero padding
  without a mask, shifted or not -> :class:`~attnsr.windows.RectWindowAttention`,
  :class:`~attnsr.windows.AdaptiveRectWindowAttention`;
- attnsr's own layers: switched to the requested backend.

What looks like attention but is left (a variant not fused, a look-alike computing something
else) is listed in ``model.attnsr_left``.

The replacements adopt the original layers instead of copying them: the model keeps its own
modules and Parameter objects (an optimizer built before the swap still trains the model), their
``requires_grad`` flags, device and dtype, and each replacement takes the train/eval mode of the
module it replaces. Where attnsr's layout fuses weights (q, k, v in one convolution), the fused
weight is concatenated from the originals in each forward. A self-attention block keeps its
state_dict keys (``conv_q`` ...), and so do window attentions and blocks (they adopt the module's
children and buffers under their names); a channel attention's MLP becomes ``fc1``/``fc2`` and accepts its
old keys as aliases, so a checkpoint saved before the swap loads after it.
"""

import copy
import inspect
import logging

import torch
from torch import nn

from attnsr.backends import check_backend
from attnsr.layers import (
    AdaptiveTransposedAttention,
    ChannelAttention,
    SelfAttention2d,
    TransposedAttention,
    _AttnsrLayer,
    _mlp_dims,
)
from attnsr.windows import (
    AdaptiveRectWindowAttention,
    HybridAttentionBlock,
    RectWindowAttention,
    SwinBlock,
    SwinV2Block,
    WindowAttention,
    WindowAttentionMap,
    WindowAttentionQKV,
    WindowAttentionRPI,
    WindowAttentionToQKV,
    WindowAttentionV2,
    WindowAttentionV2Map,
    is_standard_index,
    standard_index,
)

logger = logging.getLogger("attnsr.swap")


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _plain_conv(conv, kernel: int, padding: int) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (kernel, kernel) and conv.stride == (1, 1)
            and conv.padding == (padding, padding) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def _as_self_attention(module: nn.Module, backend: str):
    convs = [getattr(module, n, None) for n in ("conv_q", "conv_k", "conv_v", "conv_out")]
    if not all(isinstance(c, nn.Conv2d) for c in convs):
        return None
    q, k, v, out = convs
    ks = q.kernel_size[0]
    if ks % 2 != 1 or not all(_plain_conv(c, ks, ks // 2) for c in (q, k, v)) or not _plain_conv(out, 1, 0):
        return None
    if {(c.in_channels, c.out_channels) for c in (q, k, v)} != {(q.in_channels, q.out_channels)}:
        return None
    if (out.in_channels, out.out_channels) != (q.out_channels, q.in_channels):
        return None
    has_bias = {c.bias is not None for c in convs}
    if len(has_bias) != 1 or _param_count(module) != sum(_param_count(c) for c in convs):
        return None
    return SelfAttention2d.from_convs(q, k, v, out, backend=backend)


def _mlp_layer(layer):
    """(in, out) of a 1×1 conv or a Linear, else None."""
    return _mlp_dims(layer) if isinstance(layer, nn.Linear) or _plain_conv(layer, 1, 0) else None


def _is_global_avg_pool(m) -> bool:
    return isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))


def _channel_parts(module: nn.Module):
    """The (name, layer) pieces of a channel attention in the order they are registered, a
    Sequential child opened up: RCAN's CALayer (pool, Sequential[conv, ReLU, conv, Sigmoid]), HAT's
    (Sequential[pool, conv, ReLU, conv, Sigmoid]), torchvision's SqueezeExcitation (avgpool, fc1,
    fc2, activation, scale_activation), timm's SE modules (fc1/conv_reduce, [bn: Identity], act,
    fc2/conv_expand, gate; they pool in forward)."""
    parts = []
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential):
            parts += [(f"{name}.{i}", m) for i, m in child.named_children()]
        else:
            parts.append((name, child))
    return [(n, m) for n, m in parts if not isinstance(m, nn.Identity)]


def _acts_like(module: nn.Module, fn) -> bool:
    """A parameterless module that computes ``fn`` elementwise (nn.ReLU, nn.Sigmoid, or a library's
    own class for them, as timm has), checked on a probe."""
    if _param_count(module) or len(list(module.children())):
        return False
    # far beyond ±6, so that ReLU6 or a clipped Hardtanh is not taken for ReLU, nor a hard sigmoid for one
    probe = torch.cat([torch.linspace(-6, 6, 25), torch.tensor([-1e4, -100.0, -7.5, 6.5, 7.5, 100.0, 1e4])])
    probe = probe.to(torch.float64).view(1, -1, 1, 1)
    try:
        with torch.no_grad():
            return torch.allclose(module(probe.clone()), fn(probe), rtol=1e-12, atol=1e-12)
    except Exception:  # not an elementwise function of a tensor
        return False


# the hidden activations of a squeeze-excitation MLP the fused channel gate computes (nn.GELU's
# default erf form; its tanh approximation differs by up to 5e-4 and is not taken)
_HIDDEN_ACTS = (("relu", torch.relu), ("gelu", nn.functional.gelu), ("silu", nn.functional.silu))


def _as_channel_attention(module: nn.Module, backend: str):
    if isinstance(module, nn.Sequential):  # it returns the gate alone: x · gate is taken around it
        return None
    parts = _channel_parts(module)
    pools = [m for _, m in parts if _is_global_avg_pool(m)]
    rest = [(n, m) for n, m in parts if not _is_global_avg_pool(m)]
    mlps = [(n, m) for n, m in rest if _mlp_layer(m) is not None]
    acts = [m for _, m in rest if _mlp_layer(m) is None]
    if len(pools) > 1 or len(mlps) != 2:
        return None
    # the activations as modules (the hidden one ReLU, GELU or SiLU, then a sigmoid), or
    # (RealCUGAN's SEBlock: two 1×1 convs, the mean, ReLU, sigmoid and product written as calls in
    # forward) none at all: the float64 probe checks the function
    act = "relu"
    if acts:
        if len(acts) != 2 or not _acts_like(acts[1], torch.sigmoid):
            return None
        act = next((name for name, fn in _HIDDEN_ACTS if _acts_like(acts[0], fn)), None)
        if act is None:
            return None
    if not acts and (pools or _forward_arity(module) != 1):
        return None
    (name1, fc1), (name2, fc2) = mlps
    dims1, dims2 = _mlp_layer(fc1), _mlp_layer(fc2)
    if dims1 != dims2[::-1] or type(fc1) is not type(fc2):
        return None
    has_bias = {fc1.bias is not None, fc2.bias is not None}
    if len(has_bias) != 1 or _param_count(module) != _param_count(fc1) + _param_count(fc2):
        return None
    new = ChannelAttention.from_mlp(fc1, fc2, act=act, backend=backend)
    for ours, theirs in (("fc1", name1), ("fc2", name2)):
        if ours != theirs:
            for kind in ("weight", "bias"):
                new.checkpoint_aliases[f"{ours}.{kind}"] = [f"{theirs}.{kind}"]
    return new


def _forward_arity(module: nn.Module) -> int:
    try:
        return len(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return -1


def _window_pair(window):
    """(Wh, Ww) of a window size given as an int or a pair of ints, else None."""
    try:
        wh, ww = (window, window) if isinstance(window, int) else tuple(window)
    except (TypeError, ValueError):
        return None
    return (wh, ww) if isinstance(wh, int) and isinstance(ww, int) else None


def _window_geometry(module: nn.Module, window_attr: str = "window_size"):
    """(dim, heads, Wh, Ww) of a module that looks like a window attention (int ``dim`` and
    ``num_heads``, heads dividing dim, its window size (attribute ``window_attr``: Uformer's is
    ``win_size``) an int or a pair), else None."""
    dim, heads, window = (getattr(module, a, None) for a in ("dim", "num_heads", window_attr))
    if not (isinstance(dim, int) and isinstance(heads, int) and heads > 0 and not dim % heads):
        return None
    pair = _window_pair(window)
    return None if pair is None else (dim, heads, *pair)


def _linear(layer, n_in: int, n_out: int) -> bool:
    return isinstance(layer, nn.Linear) and (layer.in_features, layer.out_features) == (n_in, n_out)


def _no_attention_dropout(module: nn.Module) -> bool:
    """No ``attn_drop``, or an nn.Dropout with p = 0 (attention dropout is not fused)."""
    drop = getattr(module, "attn_drop", None)
    return drop is None or (isinstance(drop, nn.Dropout) and drop.p == 0)


def _fusable_attention(module: nn.Module, wh: int, ww: int, index_required: bool) -> bool:
    """No dropout of the attention probabilities, and Swin's relative position index if it keeps one."""
    if not _no_attention_dropout(module):
        return False
    index = getattr(module, "relative_position_index", None)
    if index is None:
        return not index_required
    return is_standard_index(index, (wh, ww))


def _as_window_attention(module: nn.Module, backend: str):
    """A Swin-style window attention: a (2Wh−1)(2Ww−1)×heads ``relative_position_bias_table``, a
    ``proj`` Linear C → C, a ``qkv`` Linear C → 3C (unless the caller projects: ATD), dropouts of
    attention probabilities at 0, Swin's index if it keeps one, nothing else with parameters.
    The forward's arity picks the signature: (x, mask), (x, rpi, mask) or (qkv, rpi, mask)."""
    table, geometry = getattr(module, "relative_position_bias_table", None), _window_geometry(module)
    if not isinstance(table, nn.Parameter) or geometry is None:
        return None
    dim, heads, wh, ww = geometry
    proj, qkv = getattr(module, "proj", None), getattr(module, "qkv", None)
    if table.shape != ((2 * wh - 1) * (2 * ww - 1), heads) or not _linear(proj, dim, dim):
        return None
    if (qkv is not None and not _linear(qkv, dim, 3 * dim)) or not _fusable_attention(module, wh, ww, False):
        return None
    expected = table.numel() + _param_count(proj) + (_param_count(qkv) if qkv is not None else 0)
    if _param_count(module) != expected or not isinstance(getattr(module, "scale", None), float):
        return None
    cls = {(2, True): WindowAttention, (3, True): WindowAttentionRPI, (3, False): WindowAttentionQKV}.get(
        (_forward_arity(module), qkv is not None))
    return None if cls is None else cls.from_module(module, backend=backend)


def _as_window_attention_v2(module: nn.Module, backend: str):
    """Swin V2's window attention: ``logit_scale`` (heads, 1, 1), ``cpb_mlp`` Sequential[Linear(2, h),
    ReLU, Linear(h, heads, no bias)] over the buffer ``relative_coords_table``, a bias-free ``qkv``
    Linear C → 3C with ``q_bias`` / ``v_bias`` (or none), ``proj``, Swin's index, attention dropout 0,
    forward(x, mask)."""
    logit, mlp = getattr(module, "logit_scale", None), getattr(module, "cpb_mlp", None)
    geometry = _window_geometry(module)
    if geometry is None:
        return None
    dim, heads, wh, ww = geometry
    if not (isinstance(logit, nn.Parameter) and logit.shape == (heads, 1, 1) and _is_cpb_mlp(mlp, heads)):
        return None
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    if not (_linear(qkv, dim, 3 * dim) and qkv.bias is None and _linear(proj, dim, dim)):
        return None
    q_bias, v_bias = getattr(module, "q_bias", None), getattr(module, "v_bias", None)
    if (q_bias is None) != (v_bias is None) or (q_bias is not None and q_bias.shape != (dim,)):
        return None
    coords = getattr(module, "relative_coords_table", None)
    if not isinstance(coords, torch.Tensor) or coords.shape != (1, 2 * wh - 1, 2 * ww - 1, 2):
        return None
    if not _fusable_attention(module, wh, ww, True):
        return None
    expected = sum(_param_count(m) for m in (qkv, proj, mlp)) + logit.numel() + 2 * dim * (q_bias is not None)
    if _param_count(module) != expected or _forward_arity(module) != 2:
        return None
    return WindowAttentionV2.from_module(module, backend=backend)


def _is_cpb_mlp(mlp, heads: int) -> bool:
    """Swin V2's continuous position bias MLP: Sequential[Linear(2, h), ReLU, Linear(h, heads, no bias)]."""
    return (isinstance(mlp, nn.Sequential) and len(mlp) == 3 and isinstance(mlp[0], nn.Linear)
            and _acts_like(mlp[1], torch.relu) and mlp[0].in_features == 2
            and _linear(mlp[2], mlp[0].out_features, heads) and mlp[2].bias is None)


def _as_v2_map_window_attention(module: nn.Module, backend: str):
    """GRL's window attention: int ``num_heads`` and ``shift_size``, a pair ``window_size``, cosine
    similarity (``euclidean_dist`` off), a child ``attn_transform`` holding only ``logit_scale``
    (heads, 1, 1) and a Swin V2 ``cpb_mlp``, attention dropout 0, forward(qkv, x_size, table, index, mask)."""
    heads, shift, pair = getattr(module, "num_heads", None), getattr(module, "shift_size", None), \
        _window_pair(getattr(module, "window_size", None))
    if not (isinstance(heads, int) and heads > 0 and isinstance(shift, int) and 0 <= shift and pair is not None):
        return None
    (wh, ww), transform = pair, getattr(module, "attn_transform", None)
    logit = getattr(transform, "logit_scale", None)
    if shift >= min(wh, ww) or getattr(module, "euclidean_dist", None) is not False:
        return None
    if not (isinstance(logit, nn.Parameter) and logit.shape == (heads, 1, 1)
            and _is_cpb_mlp(getattr(transform, "cpb_mlp", None), heads)):
        return None
    if _param_count(module) != _param_count(transform) or _param_count(transform) != logit.numel() + \
            _param_count(transform.cpb_mlp) or not _fusable_attention(module, wh, ww, False):
        return None
    if _forward_arity(module) != 5:
        return None
    return WindowAttentionV2Map.from_module(module, backend=backend)


def _as_split_window_attention(module: nn.Module, backend: str):
    """Uformer's window attention: int ``dim`` and ``num_heads``, a pair ``win_size``, Swin's table
    and index, ``qkv`` holding only ``to_q`` Linear C → C and ``to_kv`` Linear C → 2C, ``proj`` Linear
    C → C, attention dropout 0, a float ``scale``, nothing else with parameters, forward(x, attn_kv, mask)."""
    geometry = _window_geometry(module, "win_size")
    if geometry is None:
        return None
    dim, heads, wh, ww = geometry
    table, qkv, proj = (getattr(module, a, None) for a in ("relative_position_bias_table", "qkv", "proj"))
    if not (isinstance(table, nn.Parameter) and table.shape == ((2 * wh - 1) * (2 * ww - 1), heads)
            and _linear(proj, dim, dim)):
        return None
    to_q, to_kv = getattr(qkv, "to_q", None), getattr(qkv, "to_kv", None)
    if not (_linear(to_q, dim, dim) and _linear(to_kv, dim, 2 * dim)) or getattr(qkv, "heads", None) != heads:
        return None
    if _param_count(qkv) != _param_count(to_q) + _param_count(to_kv) or not _fusable_attention(module, wh, ww, True):
        return None
    if _param_count(module) != table.numel() + _param_count(qkv) + _param_count(proj):
        return None
    if not isinstance(getattr(module, "scale", None), float) or _forward_arity(module) != 3:
        return None
    return WindowAttentionToQKV.from_module(module, backend=backend)


def _as_map_window_attention(module: nn.Module, backend: str):
    """SCUNet's WMSA: ``embedding_layer`` Linear C → 3C, ``linear`` Linear C → C_out,
    ``relative_position_params`` (heads, 2W−1, 2W−1), int ``window_size``, ``n_heads`` × ``head_dim``
    = C, ``type`` "W" or "SW", a float ``scale``, nothing else with parameters, forward(x)."""
    dim, heads, head_dim, window = (getattr(module, a, None) for a in ("input_dim", "n_heads", "head_dim",
                                                                         "window_size"))
    if not all(isinstance(v, int) and v > 0 for v in (dim, heads, head_dim, window)) or heads * head_dim != dim:
        return None
    embed, out, params = (getattr(module, a, None) for a in ("embedding_layer", "linear", "relative_position_params"))
    if not (_linear(embed, dim, 3 * dim) and isinstance(out, nn.Linear) and out.in_features == dim):
        return None
    if not (isinstance(params, nn.Parameter) and params.shape == (heads, 2 * window - 1, 2 * window - 1)):
        return None
    if getattr(module, "type", None) not in ("W", "SW") or not isinstance(getattr(module, "scale", None), float):
        return None
    if _param_count(module) != params.numel() + _param_count(embed) + _param_count(out) or _forward_arity(module) != 1:
        return None
    return WindowAttentionMap.from_module(module, backend=backend)


def _as_swin_block(module: nn.Module, backend: str):
    """SwinIR's / DRCT's SwinTransformerBlock (norm1, attn, drop_path, norm2, mlp; forward(x, x_size))
    or HAT's HAB (the same and a conv_block, conv_scale; forward(x, x_size, rpi_sa, attn_mask))."""
    children = dict(module.named_children())
    if not isinstance(children.get("norm1"), nn.LayerNorm) or not isinstance(children.get("norm2"), nn.LayerNorm):
        return None
    if not all(isinstance(getattr(module, a, None), int) for a in ("window_size", "shift_size")):
        return None
    if module.shift_size and not isinstance(getattr(module, "input_resolution", None), (tuple, list)):
        return None
    arity = _forward_arity(module)
    cls, extra = {2: (SwinBlock, set()), 4: (HybridAttentionBlock, {"conv_block"})}.get(arity, (None, None))
    if cls is None or set(children) - {"attn", "drop_path"} != {"norm1", "norm2", "mlp"} | extra:
        return None
    if cls is HybridAttentionBlock and not isinstance(getattr(module, "conv_scale", None), (int, float)):
        return None
    attn = children.get("attn")
    inner = _as_window_attention(attn, backend) if attn is not None else None
    if inner is None and cls is SwinBlock and attn is not None:  # Swin V2's post-norm block (Swin2SR)
        inner = _as_window_attention_v2(attn, backend)
        cls = SwinV2Block if inner is not None else cls
    want = {SwinBlock: WindowAttention, SwinV2Block: WindowAttentionV2, HybridAttentionBlock: WindowAttentionRPI}[cls]
    if type(inner) is not want or inner.window_size != (module.window_size, module.window_size):
        return None
    return cls.from_module(module, inner, backend=backend)


def _as_transposed_attention(module: nn.Module, backend: str):
    """Restormer's MDTA ``Attention``: int ``num_heads``, Parameter ``temperature`` (heads, 1, 1),
    ``qkv`` Conv2d(C, 3C, 1), ``qkv_dwconv`` Conv2d(3C, 3C, 3, padding 1, groups 3C), ``project_out``
    Conv2d(C, C, 1), nothing else with parameters; forward(x). The float64 probe checks the function."""
    heads, temperature = getattr(module, "num_heads", None), getattr(module, "temperature", None)
    qkv, dw, proj = (getattr(module, n, None) for n in ("qkv", "qkv_dwconv", "project_out"))
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        return None
    if not (isinstance(temperature, nn.Parameter) and temperature.shape == (heads, 1, 1)):
        return None
    if not all(isinstance(m, nn.Conv2d) and m.stride == (1, 1) and m.dilation == (1, 1) and m.padding_mode == "zeros"
               for m in (qkv, dw, proj)):
        return None
    c = proj.in_channels
    shapes = [(m.in_channels, m.out_channels, m.kernel_size, m.groups, m.padding) for m in (qkv, dw, proj)]
    if c % heads or shapes != [(c, 3 * c, (1, 1), 1, (0, 0)), (3 * c, 3 * c, (3, 3), 3 * c, (1, 1)),
                               (c, c, (1, 1), 1, (0, 0))]:
        return None
    expected = heads + sum(_param_count(m) for m in (qkv, dw, proj))
    if _param_count(module) != expected or _forward_arity(module) != 1:
        return None
    return TransposedAttention.from_module(module, backend=backend)


_RECT_PARTS = {RectWindowAttention: {"qkv", "proj", "proj_drop", "attns", "get_v"},  # RGT's L_SA
               AdaptiveRectWindowAttention: {"qkv", "proj", "proj_drop", "attns", "dwconv", "channel_interaction",
                                             "spatial_interaction"}}  # DAT's Adaptive_Spatial_Attention


def _int_pair(value):
    """A split or shift size given as two ints (a list or a tuple), else None."""
    pair = tuple(value) if isinstance(value, (list, tuple)) else ()
    return pair if len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in pair) else None


def _rect_half(attn, dim: int, window) -> bool:
    """One half of a rectangle-window attention (DAT's ``Spatial_Attention``, RGT's ``WindowAttention``):
    int ``dim`` and ``num_heads`` dividing it, float ``scale``, window ``H_sp`` × ``W_sp``, attention
    dropout 0, a bool ``position_bias`` and with it a position MLP ``pos`` (its only parameters) over
    the buffer ``rpe_biases`` ((2Wh−1)(2Ww−1) rows) and Swin's index; forward(qkv, H, W, mask)."""
    heads = getattr(attn, "num_heads", None)
    if getattr(attn, "dim", None) != dim or not isinstance(heads, int) or heads < 1 or dim % heads:
        return False
    if (getattr(attn, "H_sp", None), getattr(attn, "W_sp", None)) != window or not isinstance(
            getattr(attn, "scale", None), float) or _forward_arity(attn) != 4:
        return False
    wh, ww = window
    if not _fusable_attention(attn, wh, ww, False):
        return False
    if not isinstance(getattr(attn, "position_bias", None), bool):
        return False
    if not attn.position_bias:
        return _param_count(attn) == 0
    biases, pos = getattr(attn, "rpe_biases", None), getattr(attn, "pos", None)
    if not (isinstance(pos, nn.Module) and isinstance(biases, torch.Tensor) and is_standard_index(
            getattr(attn, "relative_position_index", None), window)):
        return False
    # the MLP's row r is the bias of Swin's offset r (the index is Swin's), whatever rpe_biases holds
    return biases.dim() == 2 and biases.shape[0] == (2 * wh - 1) * (2 * ww - 1) and \
        _param_count(attn) == _param_count(pos)


def _as_rect_window_attention(module: nn.Module, backend: str):
    """DAT's ``Adaptive_Spatial_Attention`` and RGT's ``L_SA``: int ``dim`` (even) and ``num_heads``,
    ``split_size`` (Wh, Ww) and ``shift_size`` (sh, sw) below it, int ``patches_resolution``, ``qkv``
    Linear C → 3C, ``proj`` Linear C → C, ``attns`` two halves on C/2 channels in Wh×Ww and Ww×Wh
    windows (``_rect_half``), the buffers ``attn_mask_0`` and ``attn_mask_1`` (both None: not
    shifted), and the convolution branch (RGT: ``get_v``; DAT: ``dwconv`` and the interaction maps),
    nothing else; forward(x, H, W). The float64 probe checks the function, padding and shift included."""
    dim, heads, resolution = (getattr(module, a, None) for a in ("dim", "num_heads", "patches_resolution"))
    split, shift = _int_pair(getattr(module, "split_size", None)), _int_pair(getattr(module, "shift_size", None))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (dim, heads, resolution)):
        return None
    if split is None or shift is None or dim % 2 or not all(0 < s and 0 <= t < s for s, t in zip(split, shift)):
        return None
    cls = next((c for c, parts in _RECT_PARTS.items() if set(dict(module.named_children())) == parts), None)
    attns = getattr(module, "attns", None)
    if cls is None or not (isinstance(attns, nn.ModuleList) and len(attns) == 2) or _forward_arity(module) != 3:
        return None
    if not (_linear(module.qkv, dim, 3 * dim) and _linear(module.proj, dim, dim)):
        return None
    if not (_rect_half(attns[0], dim // 2, split) and _rect_half(attns[1], dim // 2, split[::-1])):
        return None
    masks = [module._buffers.get(f"attn_mask_{i}", 0) for i in (0, 1)]
    if not (all(m is None for m in masks) or all(isinstance(m, torch.Tensor) for m in masks)):
        return None
    if _param_count(module) != sum(_param_count(m) for m in module.children()):
        return None
    return cls.from_module(module, backend=backend)


def _as_adaptive_transposed_attention(module: nn.Module, backend: str):
    """DAT's ``Adaptive_Channel_Attention``: int ``num_heads``, Parameter ``temperature`` (heads, 1, 1),
    ``qkv`` Linear C → 3C, ``proj`` Linear C → C, attention dropout 0, the children ``proj_drop``,
    ``dwconv``, ``channel_interaction`` and ``spatial_interaction`` and nothing else, nothing else
    with parameters; forward(x, H, W). The float64 probe checks the function."""
    heads, temperature = getattr(module, "num_heads", None), getattr(module, "temperature", None)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        return None
    if not (isinstance(temperature, nn.Parameter) and temperature.shape == (heads, 1, 1)):
        return None
    parts = {"qkv", "attn_drop", "proj", "proj_drop", "dwconv", "channel_interaction", "spatial_interaction"}
    if set(dict(module.named_children())) != parts or _forward_arity(module) != 3:
        return None
    dim = module.proj.in_features if isinstance(module.proj, nn.Linear) else 0
    if not (dim and not dim % heads and _linear(module.qkv, dim, 3 * dim) and _linear(module.proj, dim, dim)):
        return None
    if not _no_attention_dropout(module):
        return None
    if _param_count(module) != heads + sum(_param_count(m) for m in module.children()):
        return None
    return AdaptiveTransposedAttention.from_module(module, backend=backend)


def _probe(shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _probe_call(new: nn.Module):
    """A function running a module on float64 CPU inputs that exercise what ``new`` replaces it with."""
    if isinstance(new, SelfAttention2d):
        return lambda m: m(_probe((2, new.in_channels, 6, 5)))
    if isinstance(new, AdaptiveTransposedAttention):
        return lambda m: m(_probe((2, 30, new.dim)), 6, 5)
    if isinstance(new, RectWindowAttention):
        # a map padded to whole windows and not at the training resolution (Swin's mask when
        # shifted), and the training resolution less a row (the layer's own mask buffers)
        side, res, c = max(new.split_size), new.patches_resolution, new.dim
        sizes = [(2, side + 1, 3 * side - 1)] + ([(1, res - (side > 1), res)] if not res % side else [])
        probes = [(_probe((b, h * w, c), i), h, w) for i, (b, h, w) in enumerate(sizes)]
        return lambda m: torch.cat([m(*args).flatten() for args in probes])
    if isinstance(new, TransposedAttention):
        return lambda m: m(_probe((2, new.dim, 6, 5)))
    if isinstance(new, ChannelAttention):
        return lambda m: m(_probe((2, new.channels, 6, 5)))
    if isinstance(new, WindowAttentionV2Map):  # two windows a side, with and without a mask
        (wh, ww), heads = new.window_size, new.num_heads
        h, w, c, n = 2 * wh, 2 * ww, 4 * heads, wh * ww
        qkv, table = _probe((2, h * w, 3 * c)), _probe((1, 2 * wh - 1, 2 * ww - 1, 2), 1)
        index, mask = standard_index((wh, ww)), _probe((4, n, n), 2) * 4
        return lambda m: torch.cat([m(qkv, (h, w), table, index, None), m(qkv, (h, w), table, index, mask)])
    if isinstance(new, WindowAttentionToQKV):
        (wh, ww), c = new.window_size, new.dim
        n = wh * ww
        x, mask, kv = _probe((6, n, c)), _probe((3, n, n), 1) * 4, _probe((n, c), 2)
        return lambda m: torch.cat([m(x), m(x, None, mask), m(x, kv)])
    if isinstance(new, WindowAttentionMap):  # two windows a side: the shifted mask has all its regions
        (wh, ww), c = new.window_size, new.dim
        x = _probe((2, 2 * wh, 2 * ww, c))
        return lambda m: m(x)
    if isinstance(new, WindowAttention):
        (wh, ww), c = new.window_size, new.dim
        n = wh * ww
        x, mask = _probe((6, n, c)), _probe((3, n, n), 1) * 4
        if type(new) in (WindowAttention, WindowAttentionV2):
            return lambda m: torch.cat([m(x), m(x, mask)])
        rpi = standard_index((wh, ww))
        x = _probe((6, n, 3 * c)) if type(new) is WindowAttentionQKV else x
        return lambda m: torch.cat([m(x, rpi), m(x, rpi, mask)])
    if isinstance(new, SwinBlock):  # its training resolution, or two windows a side where that is not whole windows
        h, w = new.input_resolution or (0, 1)
        if not h or h % new.window_size or w % new.window_size:
            h, w = 2 * new.window_size, 2 * new.window_size
        x = _probe((1, h * w, new.attn.dim))
        if type(new) in (SwinBlock, SwinV2Block):
            return lambda m: m(x, (h, w))
        from attnsr.kernels.reference import swin_shift_mask

        mask = swin_shift_mask(h, w, new.window_size, new.shift_size, dtype=torch.float64) if new.shift_size else None
        rpi = standard_index(new.window_size)
        return lambda m: m(x, (h, w), rpi, mask)
    raise TypeError(f"no probe for {type(new).__name__}")


def _same_function(old: nn.Module, new: nn.Module) -> bool:
    """Both modules give the same output on a float64 probe on CPU (the new one on its torch backend)."""
    run = _probe_call(new)
    old, new = copy.deepcopy(old).cpu().double(), copy.deepcopy(new).cpu().double()
    for m in new.modules():
        if isinstance(m, _AttnsrLayer):
            m.backend = "torch"
    try:
        with torch.no_grad():
            expect, got = run(old.eval()), run(new.eval())
    except Exception as err:  # the module's forward may not accept this probe: then it is not a match
        logger.debug("swap_attention: probe failed on %s: %s", type(old).__name__, err)
        return False
    return expect.shape == got.shape and torch.allclose(expect, got, rtol=1e-9, atol=1e-9)


_BUILDERS = (_as_swin_block, _as_window_attention, _as_window_attention_v2, _as_map_window_attention,
             _as_split_window_attention, _as_v2_map_window_attention, _as_rect_window_attention,
             _as_transposed_attention, _as_adaptive_transposed_attention, _as_self_attention, _as_channel_attention)

# What a swapped layer runs in PyTorch around its fused attention and looks like attention itself:
# DAT's adaptive interaction maps, (child, the branch it reads, the branch its sigmoid gates).
_UNFUSED_PARTS = {
    AdaptiveRectWindowAttention: (("channel_interaction", "convolution", "attention"),
                                  ("spatial_interaction", "attention", "convolution")),
    AdaptiveTransposedAttention: (("channel_interaction", "attention", "convolution"),
                                  ("spatial_interaction", "convolution", "attention")),
}


def _interaction_reason(name: str, part: nn.Module, source: str, target: str) -> str:
    """Why a swapped DAT layer's interaction map ``name`` (``channel_interaction`` or
    ``spatial_interaction``) is listed in ``attnsr_left``."""
    layers = ", ".join(type(m).__name__ for m in part.children()) or type(part).__name__
    return (f"DAT's adaptive interaction (AIM) {name.split('_')[0]} map of the {source} branch ({layers}), its "
            f"sigmoid gating the {target} branch: computed by PyTorch around the fused attention (the fused gates "
            "gate their own input through a ReLU MLP without normalisation)")


def _looks_like_attention(module: nn.Module) -> str | None:
    """Why a module that was not swapped still looks like an attention layer, or None."""
    if hasattr(module, "logit_scale") and hasattr(module, "cpb_mlp"):
        if not hasattr(module, "qkv") and _forward_arity(module) == 4:  # GRL's AffineTransform(attn, table, ...)
            return None  # the logit scale and position bias applied inside an attention: not one itself
        return "a Swin V2 window attention this version does not fuse (structure or function differs)"
    parts = [m for _, m in _channel_parts(module)]
    mlps = [m for m in parts if _mlp_layer(m) is not None]
    norms = [m for m in parts if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    acts = [m for m in parts if _mlp_layer(m) is None and not _is_global_avg_pool(m)
            and not isinstance(m, nn.modules.batchnorm._BatchNorm)]
    pooled_mlp = len(mlps) == 2 and any(_is_global_avg_pool(m) for m in parts) and \
        _mlp_layer(mlps[0]) == _mlp_layer(mlps[1])[::-1]
    if pooled_mlp and len(acts) == 2 and not norms:
        what = f"a squeeze-excitation channel attention with {type(acts[0]).__name__} and {type(acts[1]).__name__}"
        if isinstance(module, nn.Sequential) and _acts_like(acts[1], torch.sigmoid) and \
                any(_acts_like(acts[0], fn) for _, fn in _HIDDEN_ACTS):
            return (f"{what} that returns the gate alone (the product with x is taken by the module around it, "
                    "which the fused gate would replace too): not fused")
        return f"{what} (the fused gate computes ReLU, GELU or SiLU, then a sigmoid): not fused"
    if pooled_mlp and len(acts) == 1 and len(norms) == 1:
        return (f"a channel map without a gate (average pool, two 1×1 layers C → h → C, a {type(norms[0]).__name__} "
                f"and a {type(acts[0]).__name__}, no sigmoid: the form of DAT's adaptive interaction, whose sigmoid "
                "the module around it takes): not fused")
    rg_sa = _recursive_generalization_reason(module)
    if rg_sa is not None:
        return rg_sa
    if _is_feed_forward_gate(module):
        return ("a feed-forward's spatial gate (a LayerNorm and a depthwise convolution, forward(x, H, W): DAT's "
                "SpatialGate, RGT's Gate, which multiply half of the channels by the other half normalised and "
                "convolved): no attention weights (no softmax, no sigmoid), left to PyTorch")
    children = list(module.children())
    if len(children) == 2 and _is_global_avg_pool(children[0]) and _mlp_layer(children[1]) is not None and \
            isinstance(module, nn.Sequential) and _mlp_layer(children[1])[0] == _mlp_layer(children[1])[1]:
        return ("simplified channel attention (NAFNet's SCA: average pool and one 1×1 conv, no sigmoid; the "
                "product with x is taken by the block around it): not fused")
    if hasattr(module, "stripe_size") and hasattr(module, "anchor_window_down_factor"):
        return ("anchor stripe attention (GRL's: stripes attend to a down-sampled anchor map and back, two "
                "chained attentions of different shapes): not fused")
    if hasattr(module, "offset_range_factor") and hasattr(module, "proj_q") and hasattr(module, "k_u"):
        return ("a deformable-attention upsampler (queries attend to keys sampled at learned offsets, "
                "FDAT's LDA-AQU): not a window attention, not fused")
    if hasattr(module, "overlap_win_size"):
        return "overlapping cross-attention (keys from larger windows than the queries): not fused"
    if hasattr(module, "num_tokens") and hasattr(module, "category_size"):
        return "adaptive category attention (tokens grouped by a learned dictionary, ATD's): not fused"
    if hasattr(module, "num_tokens") and isinstance(getattr(module, "scale", None), torch.Tensor):
        return "token-dictionary cross-attention (queries against a learned dictionary, ATD's): not fused"
    if isinstance(getattr(module, "relative_position_bias_table", None), torch.Tensor):
        return "a window attention this version does not fuse (structure or function differs)"
    heads = [p.shape[0] for n, p in module.named_parameters(recurse=False)
             if n in ("temperature", "temp", "rescale") and p.dim() == 3 and p.shape[1:] == (1, 1)]
    if heads and _softmax_in_forward(module):
        return ("transposed (channel) attention: a softmax over a d×d map per head, tokens L2-normalised "
                "(Restormer's MDTA form): not fused in this version")
    if _softmax_in_forward(module):
        return (f"attention-like (a softmax in its forward) in a form this version does not recognise "
                f"({type(module).__name__}): not fused")
    return None


def _recursive_generalization_reason(module: nn.Module) -> str | None:
    """Why RGT's RG-SA (``q``, ``k``, ``v`` Linear layers, a strided ``reduction1`` conv, a ``cpe``
    conv) is left, or None for another module."""
    q, k, v = (getattr(module, a, None) for a in ("q", "k", "v"))
    heads = getattr(module, "num_heads", None)
    if not (all(isinstance(m, nn.Linear) for m in (q, k, v)) and isinstance(getattr(module, "reduction1", None),
                                                                            nn.Conv2d)
            and isinstance(getattr(module, "cpe", None), nn.Conv2d) and isinstance(heads, int) and heads > 0):
        return None
    why = ("recursive-generalization self-attention (RGT's RG-SA: every token attends to the map recursively "
           "down-sampled by a strided depthwise conv, a conv position encoding added to the values)")
    dk, dv = k.out_features // heads, v.out_features // heads
    if dk != dv:
        return (f"{why}: keys of {dk} channels per head but values of {dv}, and the fused attention takes one head "
                "dim for both: not fused")
    return f"{why}: not fused in this version"


def _is_feed_forward_gate(module: nn.Module) -> bool:
    """DAT's SpatialGate and RGT's Gate: the children ``norm`` (LayerNorm) and ``conv`` (a depthwise
    Conv2d) and nothing else, forward(x, H, W)."""
    children = dict(module.named_children())
    conv = children.get("conv")
    return (set(children) == {"norm", "conv"} and isinstance(children["norm"], nn.LayerNorm)
            and isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels
            and _forward_arity(module) == 3)


def _softmax_in_forward(module: nn.Module) -> bool:
    """Whether the module's own forward (not its children's) takes a softmax: an nn.Softmax child,
    or ``softmax`` called in the source of its class's forward."""
    if any(isinstance(m, nn.Softmax) for m in module.children()):
        return True
    forward = type(module).forward
    if forward is nn.Module.forward or type(module).__module__.startswith(("torch.", "attnsr.")):
        return False
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return False
    return "softmax(" in source


def swap_attention(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace, in place, the attention blocks of ``model`` by attnsr's layers on ``backend``.

    Returns ``model``. Each replacement (and each attnsr layer switched to ``backend``) is logged
    at INFO on the ``attnsr.swap`` logger; the list is also kept in ``model.attnsr_swapped`` as
    (qualified name, old class name, new class name) tuples. Modules that look like attention but
    were left as they are (an unsupported variant, or a look-alike computing something else) are
    logged too and listed in ``model.attnsr_left`` as (qualified name, class name, reason).
    """
    check_backend(backend)
    report, left = [], []
    if isinstance(model, _AttnsrLayer):
        for m in model.modules():
            if isinstance(m, _AttnsrLayer):
                m.backend = backend
        report.append(("", type(model).__name__, type(model).__name__))
    else:
        _swap_children(model, "", backend, report, left)
    for name, old, new in report:
        logger.info("swap_attention: %s: %s -> %s(backend=%r)", name or "<model>", old, new, backend)
    for name, old, why in left:
        logger.info("swap_attention: %s: %s left as is: %s", name, old, why)
    model.attnsr_swapped = report
    model.attnsr_left = left
    return model


def _swap_children(module: nn.Module, prefix: str, backend: str, report: list, left: list, skip=()) -> None:
    for name, child in list(module.named_children()):
        if name in skip:
            continue
        qualified = f"{prefix}{name}"
        if isinstance(child, _AttnsrLayer):
            for m in child.modules():
                if isinstance(m, _AttnsrLayer):
                    m.backend = backend
            report.append((qualified, type(child).__name__, type(child).__name__))
            continue
        new = None
        for build in _BUILDERS:
            candidate = build(child, backend)
            if candidate is not None and _same_function(child, candidate):
                new = candidate
                break
            if candidate is not None:
                left.append((qualified, type(child).__name__,
                             f"looks like {type(candidate).__name__} but computes something else"))
        if new is None:
            why = _looks_like_attention(child)
            if why is not None and not any(n == qualified for n, _, _ in left):
                left.append((qualified, type(child).__name__, why))
            _swap_children(child, qualified + ".", backend, report, left)
            continue
        new.training = child.training  # the adopted modules keep their own modes
        setattr(module, name, new)
        report.append((qualified, type(child).__name__, type(new).__name__))
        if isinstance(new, SwinBlock):  # the window attention inside it, then its other children
            report.append((f"{qualified}.attn", type(child.attn).__name__, type(new.attn).__name__))
            _swap_children(new, qualified + ".", backend, report, left, skip=("attn",))
        for part, source, target in _UNFUSED_PARTS.get(type(new), ()):
            child = getattr(new, part)
            left.append((f"{qualified}.{part}", type(child).__name__, _interaction_reason(part, child, source, target)))
