"""Nothing attention-like passes silently: on every architecture that spandrel and
spandrel_extra_arches build (tiny configurations, tests/all_architectures.py), ``swap_attention``
either swaps each attention-like module or lists it in ``model.attnsr_left`` with a reason.

"Attention-like", as this test reads a module (independently of the rules of attnsr/swap.py):

- PyTorch's ``nn.MultiheadAttention``;
- a module of the model's own code whose methods call ``softmax`` or
  ``scaled_dot_product_attention``, or ``sigmoid`` if it has parameters (a sigmoid without
  parameters is an activation, x·sigmoid(x)), or that holds an ``nn.Softmax`` / ``nn.Sigmoid`` /
  ``nn.Hardsigmoid`` among its children (or inside a child ``Sequential`` without parameters);
- a module holding a relative position bias (``relative_position_bias_table``,
  ``relative_position_params``), a Swin V2 ``logit_scale`` or a per-head temperature
  (``temperature``, ``temp``, ``rescale`` of shape (heads, 1, 1));
- a ``Sequential`` of plain layers with parameters and a sigmoid or softmax among them (a gate map).

Two exceptions, said where they are made: LaMa's FFC with ``gated=False`` has ``sigmoid`` in its
code but never computes it (its gate is an ``nn.Identity``); a module that transforms the scores
of the attention around it (its forward takes ``attn`` first: GRL's AffineTransform, the logit
scale and the 16·sigmoid position bias of GRL's attentions) is covered by that attention, swapped
or listed.

Forms that no such reading can see are pinned per architecture in ``EXPECTED`` instead (FFTformer's
frequency-domain attention, KBNet's kernel basis attention, NAFNet's simplified channel attention,
the feed-forward gates of DAT and RGT): ``EXPECTED`` is the exact set of what each architecture
swaps (the new classes) and leaves (the listed classes), as docs/layers.md tabulates it.
"""

import inspect
import re

import pytest
import torch
from torch import nn

import attnsr

pytest.importorskip("spandrel", reason="spandrel is not installed (`make test` runs this file in .venv-models)")
pytest.importorskip("spandrel_extra_arches", reason="spandrel_extra_arches is not installed (`make models-venv` "
                                                    "installs it: pip install --no-deps spandrel_extra_arches)")
from all_architectures import BUILDS

# architecture (variant) -> (the attnsr classes it swaps to, the classes it lists as left)
EXPECTED = {
    "ATD": ({"WindowAttentionQKV"}, {"ATDTransformerLayer", "ATD_CA", "AC_MSA"}),
    "AuraSR": (set(), {"AdaptiveConv2DMod", "Attend"}),
    "AuraSR:no-flash": (set(), {"AdaptiveConv2DMod", "Attend"}),
    "CRAFT": ({"RectWindowBlock"}, {"Attention"}),
    "Compact": (set(), set()),
    "DAT": ({"AdaptiveRectWindowAttention", "AdaptiveTransposedAttention"}, {"Sequential", "SpatialGate"}),
    "DCTLSA": (set(), {"WindowAttention"}),
    "DITN": (set(), {"ISA"}),
    "DRCT": ({"SwinBlock", "WindowAttention"}, set()),
    "DRUNet": (set(), set()),
    "DnCNN": (set(), set()),
    "ESRGAN": (set(), set()),
    "FBCNN": (set(), {"Sequential"}),
    "FDAT": (set(), {"FastChannelAttention", "FastSpatialWindowAttention", "LDA_AQU", "Sequential"}),
    "FDAT:pa_up": (set(), {"FastChannelAttention", "FastSpatialWindowAttention", "Sequential"}),
    "FDAT:dysample": (set(), {"DySample", "FastChannelAttention", "FastSpatialWindowAttention", "Sequential"}),
    "FFTformer": (set(), {"FSAS"}),
    "GFPGAN": (set(), set()),
    "GRL": ({"WindowAttentionV2Map"}, {"AnchorStripeAttention"}),
    "GRL:local": ({"ChannelAttention", "WindowAttentionV2Map"}, {"AnchorStripeAttention"}),
    "HAT": ({"ChannelAttention", "HybridAttentionBlock", "WindowAttentionRPI"}, {"OCAB"}),
    "HVICIDNet": (set(), {"CAB"}),
    "IPT": (set(), {"MultiheadAttention"}),
    "KBNet": (set(), {"KBBlock_s", "Sequential"}),
    "KBNet:l": ({"TransposedAttention"}, {"MFF", "Sequential"}),
    "LaMa": (set(), set()),
    "MMRealSR": (set(), {"Sequential"}),
    "MixDehazeNet": (set(), {"SKFusion", "Sequential"}),
    "MoESR": (set(), set()),
    "MoESR:dysample": (set(), {"DySample"}),
    "MoSR": (set(), set()),
    "NAFNet": (set(), {"Sequential"}),
    "OmniSR": (set(), {"Attention", "Channel_Attention", "Channel_Attention_grid", "ESA", "Sequential"}),
    "PLKSR": (set(), {"Sequential"}),
    "PLKSR:real": (set(), {"DySample", "Sequential"}),
    "RCAN": ({"ChannelAttention"}, set()),
    "RGT": ({"RectWindowAttention"}, {"Gate", "RG_SA"}),
    "RealCUGAN": ({"ChannelAttention"}, set()),
    "RealCUGAN:fast": ({"ChannelAttention"}, set()),
    "RealCUGAN:3x": ({"ChannelAttention"}, set()),
    "RealCUGAN:4x": ({"ChannelAttention"}, set()),
    "RestoreFormer": (set(), {"MultiHeadAttnBlock"}),
    "RetinexFormer": (set(), {"IG_MSA"}),
    "SAFMN": (set(), set()),
    "SAFMNBCIE": (set(), set()),
    "SCUNet": ({"WindowAttentionMap"}, set()),
    "SPAN": (set(), {"SPAB"}),
    "SeemoRe": (set(), {"MoELayer"}),
    "SwiftSRGAN": (set(), set()),
    "Swin2SR": ({"SwinV2Block", "WindowAttentionV2"}, set()),
    "SwinIR": ({"SwinBlock", "WindowAttention"}, set()),
    "Uformer": ({"WindowAttentionToQKV"}, set()),
    "Uformer:modulators": ({"WindowAttentionToQKV"}, {"Attention"}),
    "AdaCode": ({"SwinBlock", "WindowAttention"}, set()),
    "CodeFormer": (set(), {"AttnBlock", "CodeFormer", "MultiheadAttention"}),
    "DDColor": (set(), {"MultiheadAttention"}),
    "DDColor:single": (set(), {"MultiheadAttention"}),
    "FeMaSR": (set(), set()),
    "FeMaSR:LQ": ({"SwinBlock", "WindowAttention"}, set()),
    "M3SNet": ({"TransposedAttention"}, {"Sequential"}),
    "MAT": (set(), {"WindowAttention"}),
    "MIRNet2": (set(), {"ContextBlock", "SKFF"}),
    "MPRNet": ({"ChannelAttention"}, {"SAM"}),
    "Restormer": ({"TransposedAttention"}, set()),
    "SRFormer": (set(), {"PSA"}),
}

_CALLS = re.compile(r"\b(softmax|sigmoid|scaled_dot_product_attention)\(")
_GATES = (nn.Softmax, nn.Sigmoid, nn.Hardsigmoid)
_TABLES = ("relative_position_bias_table", "relative_position_params", "logit_scale")
_TEMPERATURES = ("temperature", "temp", "rescale")


def _library(module) -> bool:
    return type(module).__module__.startswith(("torch.", "attnsr."))


def _calls(cls) -> set:
    """softmax / sigmoid / scaled_dot_product_attention called in the methods of a model's class
    (not ``__init__``; comments dropped)."""
    found = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith(("torch.", "attnsr.", "builtins")):
            continue
        for name, fn in vars(klass).items():
            if name != "__init__" and inspect.isfunction(fn):
                found |= set(_CALLS.findall(re.sub(r"#.*", "", inspect.getsource(fn))))
    return found


def attention_like(module: nn.Module) -> str | None:
    """Why this test counts ``module`` as attention-like (see the module docstring), or None."""
    if isinstance(module, nn.MultiheadAttention):
        return "nn.MultiheadAttention"
    has_params = any(True for _ in module.parameters())
    children = list(module.children())
    if _library(module):
        if isinstance(module, nn.Sequential) and has_params and any(isinstance(c, _GATES) for c in children) and \
                all(_library(c) or not any(True for _ in c.parameters()) for c in children):
            return "a gate map: a Sequential of plain layers with a sigmoid or softmax"
        return None
    calls = _calls(type(module))
    if not has_params or getattr(module, "gated", None) is False:  # LaMa's FFC without its gate: never computed
        calls.discard("sigmoid")
    if calls:
        return f"calls {', '.join(sorted(calls))}"
    near = children + [m for c in children if isinstance(c, nn.Sequential) and not any(True for _ in c.parameters())
                       for m in c.children()]
    gates = [type(m).__name__ for m in near if isinstance(m, _GATES)]
    if gates:
        return f"holds {', '.join(gates)}"
    for name, p in module.named_parameters(recurse=False):
        if name in _TABLES or (name in _TEMPERATURES and p.dim() == 3 and p.shape[1:] == (1, 1)):
            return f"holds {name}"
    return None


def _scores_transform(module: nn.Module) -> bool:
    """A part of an attention that transforms its scores: forward(attn, ...)."""
    return list(inspect.signature(module.forward).parameters)[:1] == ["attn"]


def _build(key):
    torch.manual_seed(0)
    return BUILDS[key]().eval()


def test_every_architecture_of_both_registries_is_built():
    import spandrel
    import spandrel_extra_arches

    ids = {a.architecture.id for registry in (spandrel.MAIN_REGISTRY, spandrel_extra_arches.EXTRA_REGISTRY)
           for a in registry.architectures()}
    built = {key.split(":")[0] for key in BUILDS}
    assert built == ids, f"registered, no configuration: {sorted(ids - built)}; not registered: {sorted(built - ids)}"
    assert set(EXPECTED) == set(BUILDS), sorted(set(EXPECTED) ^ set(BUILDS))


@pytest.mark.parametrize("key", list(BUILDS))
def test_every_attention_like_module_is_swapped_or_listed_with_a_reason(key):
    model = _build(key)
    attnsr.swap_attention(model, backend="torch")
    listed = {name: (cls, why) for name, cls, why in model.attnsr_left}
    assert len(listed) == len(model.attnsr_left), f"{key}: a module listed twice: {model.attnsr_left}"
    for name, (cls, why) in listed.items():  # each entry names a module of the model, and says what it is
        assert type(model.get_submodule(name)).__name__ == cls, (key, name, cls)
        assert isinstance(why, str) and len(why.strip()) > 30, (key, name, why)
    # a swapped layer covers what it adopted; a listed module covers itself (its children answer for themselves)
    fused = [name for name, m in model.named_modules() if isinstance(m, attnsr.layers._AttnsrLayer)]
    unlisted = []
    for name, m in model.named_modules():
        if name in listed or any(name == f or name.startswith(f + ".") for f in fused):
            continue
        if _scores_transform(m) and name.rpartition(".")[0] in listed:
            continue
        why = attention_like(m)
        if why is not None:
            unlisted.append((name, type(m).__name__, why))
    assert not unlisted, f"{key}: attention-like, neither swapped nor listed: {unlisted}"
    swapped = {new for _, _, new in model.attnsr_swapped}
    left = {cls for cls, _ in listed.values()}
    assert (swapped, left) == EXPECTED[key], f"{key}: swapped {swapped}, left {left}"
