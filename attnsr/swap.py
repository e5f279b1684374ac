"""swap_attention: make an existing model use attnsr's layers, in place, weights and function kept.

Modules are recognised by structure, never by class name, and every candidate is checked on a
float64 probe input before it is replaced: a module whose output the replacement does not
reproduce is left untouched. Recognised:

- the inpainting document's self-attention block: Conv2d children ``conv_q``, ``conv_k``,
  ``conv_v`` (C → C', k×k, stride 1, padding k//2) and ``conv_out`` (C' → C, 1×1), nothing else
  with parameters; forward x + conv_out(softmax(qᵀk/√C) v) -> :class:`SelfAttention2d`;
- an RCAN / squeeze-excitation channel attention: an AdaptiveAvgPool2d(1) child and a Sequential
  child [1×1 Conv2d or Linear C → h, ReLU, 1×1 Conv2d or Linear h → C, Sigmoid], nothing else with
  parameters; forward x · gate -> :class:`ChannelAttention`;
- attnsr's own layers: switched to the requested backend.

The replacements keep the original parameters (values, device, dtype, count) and register their
old state_dict keys as aliases, so a checkpoint saved before the swap loads after it.
"""

import copy
import logging

import torch
from torch import nn

from attnsr.backends import check_backend
from attnsr.layers import ChannelAttention, SelfAttention2d, _AttnsrLayer

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
    new = SelfAttention2d(q.in_channels, q.out_channels, kernel_size=ks, bias=has_bias.pop(), backend=backend)
    new.to(device=q.weight.device, dtype=q.weight.dtype)
    with torch.no_grad():
        new.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        new.out.weight.copy_(out.weight)
        if new.qkv.bias is not None:
            new.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
            new.out.bias.copy_(out.bias)
    return new


def _mlp_layer(layer):
    """(in, out) of a 1×1 conv or a Linear, else None."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if _plain_conv(layer, 1, 0):
        return layer.in_channels, layer.out_channels
    return None


def _as_channel_attention(module: nn.Module, backend: str):
    children = dict(module.named_children())
    pools = [m for m in children.values() if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))]
    mlps = [(n, m) for n, m in children.items() if isinstance(m, nn.Sequential) and len(m) == 4]
    if len(pools) != 1 or len(mlps) != 1:
        return None
    name, (fc1, relu, fc2, sigmoid) = mlps[0][0], list(mlps[0][1])
    if not (isinstance(relu, nn.ReLU) and isinstance(sigmoid, nn.Sigmoid)):
        return None
    dims1, dims2 = _mlp_layer(fc1), _mlp_layer(fc2)
    if dims1 is None or dims2 is None or dims1 != dims2[::-1]:
        return None
    has_bias = {fc1.bias is not None, fc2.bias is not None}
    if len(has_bias) != 1 or _param_count(module) != _param_count(fc1) + _param_count(fc2):
        return None
    channels, hidden = dims1
    new = ChannelAttention(channels, hidden=hidden, bias=has_bias.pop(), backend=backend)
    new.to(device=fc1.weight.device, dtype=fc1.weight.dtype)
    with torch.no_grad():
        for ours, theirs in ((new.fc1, fc1), (new.fc2, fc2)):
            ours.weight.copy_(theirs.weight.reshape(ours.weight.shape))
            if ours.bias is not None:
                ours.bias.copy_(theirs.bias)
    for ours, index in (("fc1", 0), ("fc2", 2)):
        for kind in ("weight", "bias"):
            new.checkpoint_aliases[f"{ours}.{kind}"] = [f"{name}.{index}.{kind}"]
    return new


def _same_function(old: nn.Module, new: nn.Module) -> bool:
    """Both modules give the same output on a float64 probe on CPU (the new one on its torch backend)."""
    channels = new.in_channels if isinstance(new, SelfAttention2d) else new.channels
    old, new = copy.deepcopy(old).cpu().double(), copy.deepcopy(new).cpu().double()
    for m in new.modules():
        if isinstance(m, _AttnsrLayer):
            m.backend = "torch"
    probe = torch.randn(2, channels, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            expect, got = old(probe), new(probe)
    except Exception as err:  # the module's forward may not accept this probe: then it is not a match
        logger.debug("swap_attention: probe failed on %s: %s", type(old).__name__, err)
        return False
    return expect.shape == got.shape and torch.allclose(expect, got, rtol=1e-9, atol=1e-9)


def swap_attention(model: nn.Module, backend: str = "triton") -> nn.Module:
    """Replace, in place, the attention blocks of ``model`` by attnsr's layers on ``backend``.

    Returns ``model``. Each replacement (and each attnsr layer switched to ``backend``) is logged
    at INFO on the ``attnsr.swap`` logger; the list is also kept in ``model.attnsr_swapped`` as
    (qualified name, old class name, new class name) tuples.
    """
    check_backend(backend)
    report = []
    if isinstance(model, _AttnsrLayer):
        for m in model.modules():
            if isinstance(m, _AttnsrLayer):
                m.backend = backend
        report.append(("", type(model).__name__, type(model).__name__))
    else:
        _swap_children(model, "", backend, report)
    for name, old, new in report:
        logger.info("swap_attention: %s: %s -> %s(backend=%r)", name or "<model>", old, new, backend)
    model.attnsr_swapped = report
    return model


def _swap_children(module: nn.Module, prefix: str, backend: str, report: list) -> None:
    for name, child in list(module.named_children()):
        qualified = f"{prefix}{name}"
        if isinstance(child, _AttnsrLayer):
            for m in child.modules():
                if isinstance(m, _AttnsrLayer):
                    m.backend = backend
            report.append((qualified, type(child).__name__, type(child).__name__))
            continue
        new = None
        for build in (_as_self_attention, _as_channel_attention):
            candidate = build(child, backend)
            if candidate is not None and _same_function(child, candidate):
                new = candidate
                break
            if candidate is not None:
                logger.info("swap_attention: %s looks like %s but computes something else: left as is",
                            qualified, type(candidate).__name__)
        if new is not None:
            setattr(module, name, new)
            report.append((qualified, type(child).__name__, type(new).__name__))
        else:
            _swap_children(child, qualified + ".", backend, report)

