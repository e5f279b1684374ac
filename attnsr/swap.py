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
  :class:`~attnsr.windows.AdaptiveRectWindowAttention`; CRAFT's block around the same two halves
  (``SRWAB``: no padding, shifted halves without a mask, the position MLPs' offsets and index passed
  in) -> :class:`~attnsr.windows.RectWindowBlock`;
- attnsr's own layers: switched to the requested backend.

What looks like attention but is left (a variant not fused, a look-alike computing something
else) is listed in ``model.attnsr_left`` with what it is: the attention-like forms of every
architecture that spandrel and spandrel_extra_arches build are named by rules (the section "What is
left, and why" below), and a few general rules take any other softmax, sigmoid gate, PyTorch
attention module or position bias table, the model's own forward included.

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
import math
import re

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
    RectWindowBlock,
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
    if dims1 != dims2[::-1] or type(fc1) is not type(fc2) or not all(dims1):
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


_RECT_BLOCK_PARTS = {"norm1", "qkv", "proj", "get_v", "attns", "norm2", "mlp"}


def _as_rect_window_block(module: nn.Module, backend: str):
    """CRAFT's SRWAB: int ``dim`` (even), ``shift_size`` two ints below the windows, the children
    ``norm1`` and ``norm2`` (LayerNorm), ``qkv`` Linear C → 3C, ``proj`` Linear C → C, ``get_v``
    (a depthwise conv of the values), ``mlp`` and ``attns``: two halves on C/2 channels in Wh×Ww
    and Ww×Wh windows (int ``num_heads`` dividing C/2, float ``scale``, ``H_sp``, ``W_sp``, the
    position MLP ``pos`` their only parameters, no attention dropout), nothing else;
    forward(x, x_size, params, attn_mask). The float64 probe checks the function, shifted or not."""
    dim, shift = getattr(module, "dim", None), _int_pair(getattr(module, "shift_size", None))
    if isinstance(dim, bool) or not isinstance(dim, int) or dim % 2 or shift is None:
        return None
    children = dict(module.named_children())
    if set(children) != _RECT_BLOCK_PARTS or _forward_arity(module) != 4:
        return None
    if not (isinstance(children["norm1"], nn.LayerNorm) and isinstance(children["norm2"], nn.LayerNorm)
            and _linear(children["qkv"], dim, 3 * dim) and _linear(children["proj"], dim, dim)):
        return None
    attns = children["attns"]
    if not (isinstance(attns, nn.ModuleList) and len(attns) == 2):
        return None
    windows = [(getattr(a, "H_sp", None), getattr(a, "W_sp", None)) for a in attns]
    if windows[0] != windows[1][::-1] or not all(isinstance(v, int) and v > 0 for v in windows[0]):
        return None
    if not all(0 <= t < s for s, t in zip(windows[0], shift)):
        return None
    for attn in attns:
        heads = getattr(attn, "num_heads", None)
        if getattr(attn, "dim", None) != dim // 2 or not isinstance(heads, int) or heads < 1 or (dim // 2) % heads:
            return None
        if not isinstance(getattr(attn, "scale", None), float) or not _no_attention_dropout(attn):
            return None
        if not isinstance(getattr(attn, "pos", None), nn.Module) or _param_count(attn) != _param_count(attn.pos):
            return None
    if _param_count(module) != sum(_param_count(m) for m in children.values()):
        return None
    return RectWindowBlock.from_module(module, backend=backend)


def _position_offsets(window) -> torch.Tensor:
    """The ((2Wh−1)(2Ww−1), 2) table of a window's relative offsets (dh, dw), in the order of Swin's
    index: what CRAFT passes its position MLPs."""
    wh, ww = window
    dh, dw = torch.meshgrid(torch.arange(1 - wh, wh), torch.arange(1 - ww, ww), indexing="ij")
    return torch.stack([dh.flatten(), dw.flatten()], dim=1).to(torch.float64)


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
    if isinstance(new, RectWindowBlock):
        # two windows a side of each half's rectangle (a map of both sides' multiples, H ≠ W), with no
        # mask (CRAFT's call) and with a mask per half (added as it is when shifted, ignored otherwise)
        (wh, ww), c = new.half_geometry(0)[0], new.dim
        side = math.lcm(wh, ww)
        h, w = 2 * side, 3 * side
        params = {"biases_h": _position_offsets((wh, ww)), "biases_v": _position_offsets((ww, wh)),
                  "rpi_sa_h": standard_index((wh, ww)), "rpi_sa_v": standard_index((ww, wh))}
        masks = tuple(_probe((h * w // (wh * ww), wh * ww, wh * ww), 3 + i) * 4 for i in (0, 1))
        x = _probe((2, h * w, c))
        return lambda m: torch.cat([m(x, (h, w), params, (None, None)), m(x, (h, w), params, masks)])
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
             _as_split_window_attention, _as_v2_map_window_attention, _as_rect_window_attention, _as_rect_window_block,
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


# ----------------------------------------------------------------------------------------------
# What is left, and why. Every module not swapped is asked what it is (_looks_like_attention): the
# rules below, most specific first, name the attention-like forms of the published restoration
# networks (spandrel's and spandrel_extra_arches' architectures) and the look-alikes among them
# (a softmax that selects kernels, experts or codes; a sigmoid that scales offsets); a few general
# rules take the rest: any module whose own code takes a softmax or a sigmoid, PyTorch's
# nn.MultiheadAttention, a stack of layers holding a sigmoid, a window attention's bias table.
# ----------------------------------------------------------------------------------------------

_OP_PATTERNS = {"softmax": re.compile(r"\bsoftmax\("), "sigmoid": re.compile(r"\bsigmoid\("),
                "sdpa": re.compile(r"\bscaled_dot_product_attention\("), "fft": re.compile(r"\bfft\.\w*fft")}
_CLASS_OPS: dict = {}  # class -> the ops its own methods call


def _is_torch_layer(module: nn.Module) -> bool:
    """A layer of PyTorch's (or attnsr's own), whose code is not the model's."""
    return type(module).__module__.startswith(("torch.", "attnsr."))


def _class_ops(cls) -> frozenset:
    """The ops (softmax, sigmoid, sdpa, fft) that the methods a model's class defines call (every
    method but ``__init__``, in the class and its bases outside PyTorch; comments skipped)."""
    ops = _CLASS_OPS.get(cls)
    if ops is None:
        found = set()
        for klass in cls.__mro__:
            if klass.__module__.startswith(("torch.", "attnsr.", "builtins")):
                continue
            for name, fn in vars(klass).items():
                if name == "__init__" or not inspect.isfunction(fn):
                    continue
                try:
                    code = re.sub(r"#.*", "", inspect.getsource(fn))
                except (OSError, TypeError):  # no source (built at run time): nothing to read
                    continue
                found |= {op for op, pattern in _OP_PATTERNS.items() if pattern.search(code)}
        ops = _CLASS_OPS[cls] = frozenset(found)
    return ops


_GATE_LAYERS = (nn.Sigmoid, nn.Hardsigmoid)


def _own_ops(module: nn.Module) -> frozenset:
    """What a module computes itself, not through children with parameters: the ops its class's
    code calls, and an nn.Softmax or nn.Sigmoid among its children or inside a child Sequential
    without parameters (OmniSR's ``attend = Sequential(Softmax, Dropout)``)."""
    if _is_torch_layer(module):
        return frozenset()
    layers = list(module.children())
    layers += [m for c in layers if isinstance(c, nn.Sequential) and not _param_count(c) for m in c.children()]
    extra = {"softmax" for m in layers if isinstance(m, nn.Softmax)}
    extra |= {"sigmoid" for m in layers if isinstance(m, _GATE_LAYERS)}
    return _class_ops(type(module)) | extra


def _layer_names(module: nn.Module) -> str:
    return ", ".join(type(m).__name__ for m in module.children())


def _gate_layers_reason(module: nn.Module) -> str | None:
    """A Sequential of plain layers with parameters and a sigmoid among them (a gate map computed
    apart from the product: MixDehazeNet's ``Wg`` and ``pa``, FDAT's ``sg``, PLKSR's ``EA.f``,
    FBCNN's ``to_gamma``), or None."""
    if not isinstance(module, nn.Sequential) or not _param_count(module):
        return None
    layers = list(module.children())
    if not any(isinstance(m, _GATE_LAYERS) for m in layers):
        return None
    if any(_param_count(m) and not _is_torch_layer(m) for m in layers):  # a network, not a gate map
        return None
    per = ", one per channel, from the average over the pixels," if _is_global_avg_pool(layers[0]) else ""
    return (f"layers with a sigmoid ({_layer_names(module)}): values in (0, 1){per} for the module around it "
            "to apply (a gate when it multiplies features by them); attnsr's fused gates compute their gate and "
            "apply it to their own input in one op: not fused")


def _channel_map_reason(module: nn.Module) -> str | None:
    """Channel maps of other forms: squeeze-excitation with other activations or no hidden units,
    DAT's interaction map, NAFNet's simplified channel attention, or None."""
    parts = [m for _, m in _channel_parts(module)]
    mlps = [m for m in parts if _mlp_layer(m) is not None]
    norms = [m for m in parts if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    acts = [m for m in parts if _mlp_layer(m) is None and not _is_global_avg_pool(m)
            and not isinstance(m, nn.modules.batchnorm._BatchNorm)]
    pooled_mlp = len(mlps) == 2 and any(_is_global_avg_pool(m) for m in parts) and \
        _mlp_layer(mlps[0]) == _mlp_layer(mlps[1])[::-1]
    if pooled_mlp and not _mlp_layer(mlps[0])[1]:
        return (f"a squeeze-excitation channel attention whose hidden layer has no units (C → 0 → C, "
                f"{type(module).__name__}): its gate is the sigmoid of the second layer's bias alone, the same for "
                "every input: not fused")
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
    children = list(module.children())
    if isinstance(module, nn.Sequential) and len(children) == 2 and _is_global_avg_pool(children[0]) and \
            _mlp_layer(children[1]) is not None:
        c_in, c_out = _mlp_layer(children[1])
        return (f"simplified channel attention (NAFNet's SCA: average pool and one 1×1 conv, C = {c_in} → {c_out}, "
                "no sigmoid; the product with the features is taken by the block around it): not fused")
    return _gate_layers_reason(module)


def _transposed_reason(module: nn.Module, ops) -> str | None:
    """Transposed (channel) attention in the forms not fused: a softmax over a d×d map of channel
    similarities per head, with a learned temperature (heads, 1, 1), or None."""
    temperature = [n for n, p in module.named_parameters(recurse=False)
                   if n in ("temperature", "temp", "rescale") and p.dim() == 3 and p.shape[1:] == (1, 1)]
    if not temperature or "softmax" not in ops:
        return None
    why = ("transposed (channel) attention: a softmax over a d×d map of channel similarities per head, tokens "
           "L2-normalised, a learned temperature (Restormer's MDTA maths)")
    children, arity = dict(module.named_children()), _forward_arity(module)
    if arity >= 2 and isinstance(children.get("q"), nn.Conv2d) and isinstance(children.get("kv"), nn.Conv2d):
        why += ("; cross-attention: queries from one input, keys and values from the other (CRAFT's HFB "
                "attention, HVI-CIDNet's CAB)")
    elif arity >= 2 and all(isinstance(children.get(n), nn.Linear) for n in ("to_q", "to_k", "to_v")):
        why += ("; q, k, v from the first input and a second input passed in: RetinexFormer's illumination-guided "
                "IG-MSA (illumination features multiply the values, keys score the queries, a convolutional "
                "position embedding of the values is added)")
    if isinstance(getattr(module, "ps", None), int):
        why += (f"; over groups of pixels of a {module.ps}×{module.ps} partition (windows, or grids of pixels "
                f"{module.ps} apart: OmniSR's), not over the whole map")
    return why + ": not fused in this version"


def _window_attention_reason(module: nn.Module, ops) -> str | None:
    """Softmax window attentions of forms not fused, or None."""
    if "softmax" not in ops:
        return None
    drop = "" if _no_attention_dropout(module) else \
        f"; attention dropout p = {module.attn_drop.p}, which the fused layers do not apply"
    if hasattr(module, "permuted_window_size") and hasattr(module, "relative_position_bias_table"):
        return ("permuted self-attention (SRFormer's PSA): keys and values compressed to C/2 channels with each "
                "2×2 neighbourhood folded into the channels, so a window's N queries attend to N/4 keys, with an "
                f"aligned N × N/4 position bias: not the square window attention fused{drop}")
    if isinstance(getattr(module, "H_sp", None), int) and isinstance(getattr(module, "W_sp", None), int):
        return (f"one half of a rectangle-window attention ({module.H_sp}×{module.W_sp} windows, a dynamic position "
                "bias): fused only as part of the whole attention module (both halves, their qkv and proj), which "
                f"was not swapped{drop}")
    if "mask_windows" in _forward_parameters(module):
        return ("mask-aware window attention (MAT's: keys at missing pixels get −100 from the validity mask it is "
                "given, which it updates and returns; q and k from L2-normalised tokens, no position bias): not "
                "fused")
    bias = getattr(module, "bias", None)
    if isinstance(bias, nn.Parameter) and bias.dim() == 3 and bias.shape[1] == bias.shape[2]:
        return (f"window attention with a learned bias for each pair of positions in a window (a {tuple(bias.shape)} "
                "parameter, not a relative position table: FDAT's), the map zero-padded to whole windows: not "
                f"fused{drop}")
    if isinstance(getattr(module, "to_qkv", None), nn.Linear) and isinstance(getattr(module, "attend", None),
                                                                            nn.Sequential):
        pe = ", its position bias an nn.Embedding" if isinstance(getattr(module, "rel_pos_bias", None),
                                                                  nn.Embedding) else ""
        return ("window attention on a map already cut into windows or grids, (B, X, Y, w, w, C) (MaxViT's block "
                f"and grid attention, OmniSR's){pe}: not fused")
    qkv = getattr(module, "qkv", None)
    if hasattr(qkv, "to_q") and hasattr(qkv, "to_kv") and not hasattr(module, "relative_position_bias_table"):
        return ("multi-head attention without a position bias (Uformer's Attention: queries from x, keys and values "
                "from x or the attn_kv it is given, as in its cross-attention to the learned modulator): not "
                "recognised by this version, not swapped")
    softmax = [m for m in module.children() if isinstance(m, nn.Softmax)]
    if softmax and softmax[0].dim in (-2, 2) and isinstance(qkv, nn.Linear) and hasattr(module, "window_size"):
        return ("linear attention in windows (DCTLSA's): the keys softmax-normalised over a window's tokens, each "
                "query times the d×d context softmax(k)ᵀv of its head, no N×N scores and no softmax over a query's "
                "keys: not the fused softmax(q·kᵀ)·v")
    if isinstance(getattr(module, "relative_position_bias_table", None), torch.Tensor):
        return f"a window attention this version does not fuse (structure or function differs){drop}"
    return None


def _global_attention_reason(module: nn.Module, ops) -> str | None:
    """Attention over all the tokens of a map or a sequence, in forms not swapped, or None."""
    if isinstance(module, nn.MultiheadAttention):
        return ("PyTorch's nn.MultiheadAttention (tokens attend to every token of a sequence): left to PyTorch, "
                "whose module runs scaled_dot_product_attention when its weights are not asked for "
                "(need_weights=False) and forms the weights when they are")
    if "sdpa" in ops:
        why = ("attention through PyTorch's scaled_dot_product_attention, called by the module itself (the path of "
               "attnsr's torch backend): nothing to replace")
        if getattr(module, "flash", None) is False:
            why += "; here its flash switch is off, and it forms the scores with an einsum and a softmax instead"
        return why
    convs = [getattr(module, n, None) for n in ("q", "k", "v", "proj_out")]
    if "softmax" in ops and all(isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1) for c in convs) and \
            any(isinstance(m, nn.GroupNorm) for m in module.children()):
        heads = getattr(module, "head_size", 1)
        extra = f", {heads} heads" if isinstance(heads, int) and heads > 1 else ""
        if _forward_arity(module) >= 2:
            extra += ", queries from a second map when one is given (RestoreFormer's cross-attention)"
        return (f"global self-attention over all pixels of the map (VQGAN's AttnBlock form: a GroupNorm, 1×1-conv "
                f"q, k, v and proj_out, x + proj_out(softmax(q·kᵀ/√d)·v){extra}): the normalisation before q, k "
                "and v is not part of attnsr's SelfAttention2d, so it is not swapped")
    return None


def _look_alike_reason(module: nn.Module, ops) -> str | None:
    """Softmax and sigmoid modules of the published networks that are not attention over tokens,
    or attention of their own kind, or None."""
    children = dict(module.named_children())
    if "softmax" in ops:
        if isinstance(getattr(module, "height", None), int) and _is_global_avg_pool(children.get("avg_pool")):
            return (f"selective-kernel fusion (SKNet's, as MIRNet's SKFF and MixDehazeNet's SKFusion): {module.height} "
                    "branches summed, pooled, and weighted per channel by a softmax across the branches: not "
                    "attnsr's layer fusion (one weight per layer, from each layer's own average)")
        mask = children.get("conv_mask")
        if isinstance(mask, nn.Conv2d) and mask.out_channels == 1:
            return ("global context block (GCNet's): a softmax over all pixels of a 1×1-conv map pools one context "
                    "vector per image (attention pooling with a single query), which a channel MLP adds to every "
                    "pixel: no attention between pixels, not fused")
        if isinstance(children.get("experts"), nn.ModuleList) and "gate" in children:
            return ("a mixture-of-experts router (a softmax over the experts' scores weights the top experts per "
                    "image): not attention")
        weights = getattr(module, "weights", None)
        if isinstance(weights, nn.Parameter) and weights.dim() == 5:
            kernels = weights.shape[0]
            select = f"a softmax over {kernels} learned convolution kernels mixes each sample's kernel" \
                if kernels > 1 else "one kernel, so its softmax over kernels is skipped"
            return (f"adaptive kernel selection (GigaGAN's AdaptiveConv2DMod: {select}, then style modulation): "
                    "not attention")
        if "idx_pred_layer" in children and "quantize" in children:
            return ("code prediction (CodeFormer's: a softmax over the codebook's entries for each latent token, the "
                    "top entry looked up in the codebook): not attention (its transformer's attention layers are "
                    "listed on their own)")
        if "attn_atd" in children and isinstance(getattr(module, "is_last", None), bool):
            refine = ("the last of its stage, where the softmax refinement of the token dictionary is skipped"
                      if module.is_last else "its own softmax refines the token dictionary: each dictionary token "
                      "becomes a softmax-weighted mean of the image's tokens, by the similarities its ATD_CA "
                      "computed, mixed with the old one by sigmoid(σ)")
            return (f"ATD's transformer layer ({refine}); its window and dictionary attentions are modules of their "
                    "own: not fused")
    if "fft" in ops and "to_hidden" in children:
        return (f"frequency-domain self-attention (FFTformer's FSAS): q and k multiplied in the Fourier domain of "
                f"{getattr(module, 'patch_size', '?')}×{getattr(module, 'patch_size', '?')} patches (a circular "
                "convolution of q with k per patch, no softmax), normalised, times v: not the fused softmax "
                "attention")
    if isinstance(getattr(module, "attgamma", None), nn.Parameter) and callable(getattr(module, "KBA", None)):
        sets = module.attgamma.shape[1]
        return (f"kernel basis attention (KBNet's KBA): per-pixel weights from convolutions (no softmax) mix {sets} "
                "learned convolution kernels into one kernel for each pixel (a dynamic convolution, no attention "
                "between pixels): not fused")
    if "sigmoid" not in ops or not _param_count(module):  # a sigmoid without parameters: an activation (swish)
        return None
    if getattr(module, "gated", None) is False:
        return None  # LaMa's FFC with its gate switched off: no sigmoid is computed
    if getattr(module, "gated", None) is True:
        return ("LaMa's gated FFC: sigmoid gates weight the exchange between its local and global (Fourier) "
                "branches: not fused")
    if "init_pos" in module._buffers and "offset" in children:
        return "a dynamic upsampler (DySample): a sigmoid scales learned sampling offsets: no attention weights"
    conv2 = children.get("conv2")
    if "conv_f" in children and isinstance(conv2, nn.Conv2d) and conv2.stride == (2, 2):
        return ("enhanced spatial attention (RFANet's ESA): a strided convolution, max pooling and upsampling make "
                "a map, x · sigmoid(map): a gate per pixel and channel, not one of the fused gates: not fused")
    if {"c1_r", "c2_r", "c3_r"} <= set(children):
        return ("parameter-free attention (SPAN's SPAB: its convolutions' output out gives (out + x) · (sigmoid(out) "
                "− 0.5)): a gate of its own form, not one of the fused gates: not fused")
    if _forward_parameters(module)[1:2] == ["x_img"]:
        return ("supervised attention module (MPRNet's SAM): features times the sigmoid of a convolution of the "
                "stage's restored image (forward(x, x_img)): a gate per pixel and channel, not one of the fused "
                "gates: not fused")
    return (f"a sigmoid in its own forward ({type(module).__name__}): a gate or weights of its own form, not one of "
            "attnsr's fused gates: not fused")


def _forward_parameters(module: nn.Module) -> list:
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return []


def _looks_like_attention(module: nn.Module) -> str | None:
    """Why a module that was not swapped still looks like an attention layer (or is a look-alike
    worth naming), or None."""
    if hasattr(module, "logit_scale") and hasattr(module, "cpb_mlp"):
        if not hasattr(module, "qkv") and _forward_arity(module) == 4:  # GRL's AffineTransform(attn, table, ...)
            return None  # the logit scale and position bias applied inside an attention: not one itself
        return "a Swin V2 window attention this version does not fuse (structure or function differs)"
    why = _channel_map_reason(module)
    if why is not None or _is_torch_layer(module):
        return why if why is not None else _global_attention_reason(module, frozenset())
    rg_sa = _recursive_generalization_reason(module)
    if rg_sa is not None:
        return rg_sa
    if _is_feed_forward_gate(module):
        return ("a feed-forward's spatial gate (a LayerNorm and a depthwise convolution, forward(x, H, W): DAT's "
                "SpatialGate, RGT's Gate, which multiply half of the channels by the other half normalised and "
                "convolved): no attention weights (no softmax, no sigmoid), left to PyTorch")
    ops = _own_ops(module)
    why = _named_attention_reason(module) if "softmax" in ops else None  # (the models around them share attributes)
    if why is not None:
        return why
    for rule in (_transposed_reason, _window_attention_reason, _global_attention_reason, _look_alike_reason):
        why = rule(module, ops)
        if why is not None:
            return why
    if "softmax" in ops:
        return (f"attention-like (a softmax in its forward) in a form this version does not recognise "
                f"({type(module).__name__}): not fused")
    return None


def _named_attention_reason(module: nn.Module) -> str | None:
    """GRL's, FDAT's, HAT's and ATD's other attentions, known by their attributes, or None."""
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
        why = _looks_like_attention(model)  # the model's own forward (CodeFormer's code prediction)
        if why is not None:
            left.append(("", type(model).__name__, why))
        _swap_children(model, "", backend, report, left)
    for name, old, new in report:
        logger.info("swap_attention: %s: %s -> %s(backend=%r)", name or "<model>", old, new, backend)
    for name, old, why in left:
        logger.info("swap_attention: %s: %s left as is: %s", name or "<model>", old, why)
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
                why = f"looks like {type(candidate).__name__} but computes something else"
                gate = _gate_layers_reason(child)  # an SE gate map whose product the module around it takes
                left.append((qualified, type(child).__name__, why if gate is None else f"{why}: {gate}"))
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
