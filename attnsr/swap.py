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

The replacements adopt the original layers instead of copying them: the model keeps its own
modules and Parameter objects (an optimizer built before the swap still trains the model), their
``requires_grad`` flags, device and dtype, and each replacement takes the train/eval mode of the
module it replaces. Where attnsr's layout fuses weights (q, k, v in one convolution), the fused
weight is concatenated from the originals in each forward. A self-attention block keeps its
state_dict keys (``conv_q`` ...); a channel attention's MLP becomes ``fc1``/``fc2`` and accepts its
old keys as aliases, so a checkpoint saved before the swap loads after it.
"""

import copy
import logging

import torch
from torch import nn

from attnsr.backends import check_backend
from attnsr.layers import ChannelAttention, SelfAttention2d, _AttnsrLayer, _mlp_dims

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
    new = ChannelAttention.from_mlp(fc1, fc2, backend=backend)
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
            new.training = child.training  # the adopted modules keep their own modes
            setattr(module, name, new)
            report.append((qualified, type(child).__name__, type(new).__name__))
        else:
            _swap_children(child, qualified + ".", backend, report)

