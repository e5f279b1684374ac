"""swap_attention on the published SR architectures users have, as spandrel packages them: small
SwinIR, HAT, DRCT, Swin2SR, ATD, RCAN, SCUNet, GRL, Real-CUGAN, Uformer, DAT, RGT and CRAFT models. After the
swap every window, channel and transposed attention the fused layers cover is attnsr's, and the model
computes what it computed before: output, input gradient and every parameter gradient (relative
position bias tables and position MLPs included).

spandrel needs torchvision, whose wheels do not import beside the CPU torch wheel of the main test
environment; `make test` runs this file in a second environment (.venv-models, see the Makefile).
"""

import copy
import logging
import re

import pytest
import torch
from conftest import DEVICE
from tolerances import REL_TOL, assert_close_rel, rel_error

import attnsr

spandrel = pytest.importorskip("spandrel", reason="spandrel is not installed (`make test` runs this file in "
                                                  ".venv-models)")
from published_models import ARCHS, IMAGE_SIZE, build  # noqa: E402

# What each architecture keeps unswapped, and why (the table of docs/layers.md says the same).
LEFT = {
    "SwinIR": set(),
    "HAT": {"OCAB"},  # overlapping cross-attention: keys from larger windows than the queries
    "HAT-w16": {"OCAB"},
    "DRCT": set(),
    "Swin2SR": set(),
    # token-dictionary and category attention, and the layer's own softmax over the dictionary: listed
    "ATD": {"ATD_CA", "AC_MSA", "ATDTransformerLayer"},
    "RCAN": set(),
    "SCUNet": set(),
    "GRL": {"AnchorStripeAttention"},  # stripes attending to a down-sampled anchor map: listed, not fused
    "Uformer": set(),
    "RealCUGAN": set(),
    # the adaptive interaction maps (AIM) of each swapped attention, and the feed-forward's spatial gate
    "DAT": {"Sequential", "SpatialGate"},
    "RGT": {"RG_SA", "Gate"},  # recursive-generalization attention: keys and values of different head dims
    "CRAFT": {"Attention"},  # HFB's transposed cross-attention: queries from the high-frequency branch
}


# relative position bias tables: Swin's (rows, heads), SCUNet's (heads, 2W−1, 2W−1)
TABLES = ("relative_position_bias_table", "relative_position_params")


def _bias_grads(named_grads) -> dict:
    """{bias: its gradient, flattened} of (name, gradient) pairs: each relative position bias table
    on its own, and each of DAT's and RGT's dynamic position MLPs (``attns.i.pos``, the table's
    maker) as one vector of its parameters' gradients (one of them alone may be all but zero)."""
    groups = {}
    for name, grad in named_grads:
        mlp = re.match(r"(.*\.attns\.\d\.pos)\.", name)
        if name.endswith(TABLES) or mlp:
            groups.setdefault(mlp.group(1) if mlp else name, []).append(grad.flatten())
    return {bias: torch.cat(grads) for bias, grads in groups.items()}


def _build(arch, dtype):
    return build(arch, dtype, DEVICE)


def _outputs_and_grads(model, x):
    model.zero_grad()
    x = x.detach().requires_grad_()
    y = model(x.clone())  # RCAN scales its input in place
    (y * torch.linspace(-1, 1, y.numel(), device=y.device, dtype=y.dtype).view_as(y)).sum().backward()
    return y, x.grad, torch.cat([p.grad.flatten() for p in model.parameters()])


def _image(dtype, arch=None):
    size = IMAGE_SIZE.get(arch, 16)
    height, width = (size, size) if isinstance(size, int) else size
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return image.to(DEVICE, dtype)


def _covered(model):
    """Names of the window, channel and transposed attentions left in their published classes."""
    names, inside = [], []  # inside: the swapped layers and the modules listed as left, whose parts are theirs
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, attnsr.layers._AttnsrLayer) or name in {n for n, _, _ in getattr(model, "attnsr_left", ())}:
            inside.append(name)
            continue
        if hasattr(m, "relative_position_bias_table") or hasattr(m, "cpb_mlp") or \
                hasattr(m, "relative_position_params") or hasattr(m, "rpe_biases") or \
                isinstance(getattr(m, "temperature", None), torch.nn.Parameter) or \
                type(m).__name__ in ("CALayer", "ChannelAttention", "SEBlock"):
            names.append((name, type(m).__name__))
    return names


@pytest.mark.parametrize("arch", list(ARCHS))
def test_swap_covers_the_attention_and_keeps_the_function_in_float64(arch, caplog):
    model = _build(arch, torch.float64)
    x = _image(torch.float64, arch)
    before = _outputs_and_grads(model, x)
    tables = _bias_grads((n, p.grad.clone()) for n, p in model.named_parameters())
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    keys = list(checkpoint)
    with caplog.at_level(logging.INFO, logger="attnsr.swap"):
        attnsr.swap_attention(model, backend="torch")
    assert model.attnsr_swapped, f"{arch}: nothing swapped"
    left_classes = {cls for _, cls, _ in model.attnsr_left}
    assert left_classes == LEFT[arch], model.attnsr_left
    for name, old, new in model.attnsr_swapped:  # the log says what was swapped and what was left
        assert f"swap_attention: {name}: {old} -> {new}(backend='torch')" in caplog.text
    for name, old, why in model.attnsr_left:
        assert f"swap_attention: {name}: {old} left as is: {why}" in caplog.text
    unswapped = {cls for _, cls in _covered(model)}
    assert unswapped <= LEFT[arch], f"{arch}: attention left in its published class: {_covered(model)}"
    after = _outputs_and_grads(model, x)
    for got, want, what in zip(after, before, ("output", "d(image)", "parameter gradients")):
        assert_close_rel(got, want, torch.float64, f"{arch}: {what}")
    swapped_tables = _bias_grads((n, p.grad) for n, p in model.named_parameters())
    assert set(swapped_tables) == set(tables), f"{arch}: bias tables renamed by the swap: {list(swapped_tables)}"
    for name, grad in swapped_tables.items():  # each bias table's (position MLP's) gradient on its own
        assert_close_rel(grad, tables[name], torch.float64, f"{arch}: d {name}")
    # (the check above must have had tables to check: every architecture here but these has them)
    assert bool(tables) == (arch not in ("Swin2SR", "RCAN", "GRL", "RealCUGAN")), arch
    # the window attention layers and blocks keep their keys (a channel attention's MLP becomes
    # fc1/fc2, its old keys accepted as aliases): a checkpoint saved before the swap loads after it
    assert [k for k in model.state_dict() if ".attn." in k or "attn_mask" in k] == \
           [k for k in keys if ".attn." in k or "attn_mask" in k]
    model.load_state_dict(checkpoint)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_kernels_in_fp32_are_as_accurate_as_the_published_model_in_fp32(arch):
    """The swapped model on the triton backend (fp32; the interpreter on a CPU) and the untouched
    model in fp32, both against the untouched model in float64: output, input gradient and every
    parameter gradient (bias tables included). The whole network runs in fp32 (convolutions,
    LayerNorm, MLPs), so the bound is the published model's own fp32 error (twice it, or fp32's
    kernel tolerance if that is larger), not the kernel's tolerance alone."""
    reference = _build(arch, torch.float64)
    published = copy.deepcopy(reference).float()
    model = copy.deepcopy(published)
    attnsr.swap_attention(model, backend="triton")
    kinds = {new for _, _, new in model.attnsr_swapped}
    want_kinds = {"SwinIR": {"SwinBlock", "WindowAttention"},
                  "HAT": {"HybridAttentionBlock", "WindowAttentionRPI", "ChannelAttention"},
                  "HAT-w16": {"HybridAttentionBlock", "WindowAttentionRPI", "ChannelAttention"},
                  "Swin2SR": {"SwinV2Block", "WindowAttentionV2"},
                  "DRCT": {"SwinBlock", "WindowAttention"},
                  "ATD": {"WindowAttentionQKV"},
                  "RCAN": {"ChannelAttention"},
                  "SCUNet": {"WindowAttentionMap"},
                  "GRL": {"WindowAttentionV2Map"},
                  "Uformer": {"WindowAttentionToQKV"},
                  "RealCUGAN": {"ChannelAttention"},
                  "DAT": {"AdaptiveRectWindowAttention", "AdaptiveTransposedAttention"},
                  "RGT": {"RectWindowAttention"},
                  "CRAFT": {"RectWindowBlock"}}[arch]
    assert kinds == want_kinds, kinds
    want = _outputs_and_grads(reference, _image(torch.float64, arch))
    plain = _outputs_and_grads(published, _image(torch.float32, arch))
    got = _outputs_and_grads(model, _image(torch.float32, arch))
    names = [n for n, _ in reference.named_parameters()]  # the swapped model's are in the same order
    assert len(names) == len(list(model.parameters()))
    for g, p, w, what in zip(got, plain, want, ("output", "d(image)", "parameter gradients")):
        bound = max(2 * rel_error(p, w), REL_TOL[torch.float32])
        assert_close_rel(g, w, torch.float32, f"{arch}: {what}", tol=bound)
    # the bias tables' (position MLPs') gradients on their own (a small part of the parameter vector)
    grads, plain_grads, want_grads = (_bias_grads(zip(names, (p.grad for p in m.parameters())))
                                      for m in (model, published, reference))
    for name, w in want_grads.items():
        if "overlap" not in name:
            bound = max(2 * rel_error(plain_grads[name], w), REL_TOL[torch.float32])
            assert_close_rel(grads[name], w, torch.float32, f"{arch}: d {name}", tol=bound)


def test_a_rectangle_window_mask_buffer_other_than_swins_is_applied_as_it_is():
    """DAT and RGT apply their own mask buffers where the padded map is their training resolution;
    the fused layer leaves a buffer that is Swin's mask to the kernel, and applies any other (here
    an edited one, 15×16 padded to 16×16) as it is: output and every gradient equal to the module's,
    float64, on both backends. Bad input gets an error that says what was expected."""
    model = _build("DAT", torch.float64)
    original = model.layers[0].blocks[2].attn  # the shifted block
    with torch.no_grad():
        for mask in (original.attn_mask_0, original.attn_mask_1):
            mask.add_(torch.randn(mask.shape, generator=torch.Generator().manual_seed(3), dtype=mask.dtype))
    holder = torch.nn.ModuleDict({"attn": copy.deepcopy(original)})
    attnsr.swap_attention(holder, backend="torch")
    fused = holder["attn"]
    assert isinstance(fused, attnsr.AdaptiveRectWindowAttention) and fused.shifted
    x = torch.randn(2, 15 * 16, 96, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(DEVICE)

    def run(module):
        module.zero_grad()
        xg = x.clone().requires_grad_()
        y = module(xg, 15, 16)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)).sum().backward()
        return y, xg.grad, torch.cat([p.grad.flatten() for p in module.parameters()])

    want = run(original)
    for backend in ("torch", "triton"):
        fused.backend = backend
        for got, ref, what in zip(run(fused), want, ("output", "d(x)", "parameter gradients")):
            assert_close_rel(got, ref, torch.float64, f"{backend}: {what}")
    with pytest.raises(ValueError, match=r"x is \(2, 240, 96\) with H, W = 16, 16; expected \(B, H·W, C\)"):
        fused(x, 16, 16)
    with pytest.raises(TypeError, match="from_module"):
        attnsr.RectWindowAttention(96, 2)


def test_rectangle_window_look_alikes_are_left():
    """RGT's L_SA with a forward that computes something else (the same children and buffers), and
    one with attention dropout (not fused): neither is swapped, and both are listed."""
    from spandrel.architectures.RGT.__arch.rgt import L_SA

    class Residual(L_SA):
        def forward(self, x, H, W):
            return super().forward(x, H, W) + x

    model = _build("RGT", torch.float64)
    model.layers[0].blocks[0].attn.__class__ = Residual
    model.layers[0].blocks[2].attn.attns[1].attn_drop.p = 0.1
    attnsr.swap_attention(model, backend="torch")
    assert model.attnsr_swapped == [], model.attnsr_swapped
    reasons = {name: why for name, _, why in model.attnsr_left}
    assert reasons["layers.0.blocks.0.attn"] == "looks like RectWindowAttention but computes something else", reasons
    # the half with dropout, named as what it is, the dropout said (the module around it was not swapped)
    half = reasons["layers.0.blocks.2.attn.attns.1"]
    assert half.startswith("one half of a rectangle-window attention (8×4 windows"), reasons
    assert half.endswith("attention dropout p = 0.1, which the fused layers do not apply"), reasons


def _se_forms():
    """Squeeze-excitation modules as torchvision and timm ship them (both need torchvision)."""
    from torchvision.ops import SqueezeExcitation

    forms = {"torchvision SqueezeExcitation": lambda: SqueezeExcitation(16, 4)}
    try:
        from timm.layers.squeeze_excite import SEModule
        from timm.models._efficientnet_blocks import SqueezeExcite
    except ImportError:
        return forms
    forms["timm SEModule"] = lambda: SEModule(16, rd_ratio=0.25)
    forms["timm SqueezeExcite (EfficientNet)"] = lambda: SqueezeExcite(16, rd_ratio=0.25)
    return forms


@pytest.mark.parametrize("form", list(_se_forms()))
def test_squeeze_excitation_forms_of_torchvision_and_timm_are_swapped(form):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), _se_forms()[form]()).to(DEVICE, torch.float64)
    x = torch.randn(2, 3, 6, 5, device=DEVICE, dtype=torch.float64)
    before = _outputs_and_grads(model, x)
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    attnsr.swap_attention(model, backend="triton")
    assert isinstance(model[1], attnsr.ChannelAttention), model.attnsr_swapped
    for got, want, what in zip(_outputs_and_grads(model, x), before, ("output", "d(x)", "parameter gradients")):
        assert_close_rel(got, want, torch.float64, f"{form}: {what}")
    model.load_state_dict(checkpoint)  # the old keys load as aliases of fc1 / fc2


def test_an_se_gate_with_relu6_is_left():
    """ReLU6 equals ReLU on small inputs: the activation check must look past 6."""
    from torchvision.ops import SqueezeExcitation

    model = torch.nn.Sequential(SqueezeExcitation(16, 4, activation=torch.nn.ReLU6))
    attnsr.swap_attention(model, backend="torch")
    assert model.attnsr_swapped == [], model.attnsr_swapped


def test_look_alike_gates_of_torchvision_models_are_left():
    """MobileNetV3's SE gate is a hard sigmoid: same structure, another function, so nothing in it
    is swapped. EfficientNet's SE gates (SiLU, then a sigmoid) are the fused gate with act="silu":
    all 16 are swapped and the network computes what it did."""
    from torchvision.models import efficientnet_b0, mobilenet_v3_small

    model = mobilenet_v3_small().eval()
    attnsr.swap_attention(model, backend="torch")
    assert model.attnsr_swapped == [], model.attnsr_swapped
    torch.manual_seed(0)
    original = efficientnet_b0().double().eval()
    model = copy.deepcopy(original)
    attnsr.swap_attention(model, backend="torch")
    assert len(model.attnsr_swapped) == 16 and {new for _, _, new in model.attnsr_swapped} == {"ChannelAttention"}
    assert all(m.act == "silu" for m in model.modules() if isinstance(m, attnsr.ChannelAttention))
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close_rel(model(x), original(x), torch.float64, "EfficientNet-B0 with its SE gates swapped")


def test_swapped_swinir_compiles_in_one_graph_and_a_new_image_size_reuses_it():
    """torch.compile(dynamic=True, fullgraph=True) over a swapped SwinIR on the triton backend: no
    graph break (the fused blocks hold no roll, partition or data-dependent reshape), outputs equal
    to the published model, and once the first size has been specialised (SwinIR's own code
    compares x_size with its training resolution) further image sizes reuse the graph."""
    from torch._dynamo.utils import counters

    reference = _build("SwinIR", torch.float32)
    model = copy.deepcopy(reference)
    attnsr.swap_attention(model, backend="triton")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager", dynamic=True, fullgraph=True)
    graphs = []
    with torch.no_grad():
        for size in ((16, 16), (24, 16), (16, 32), (32, 24)):
            x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(2)).to(DEVICE)
            assert_close_rel(compiled(x), reference(x), torch.float32, f"compiled output at {size}")
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[2] == graphs[3], f"graphs after each size: {graphs}"


def test_hats_shifted_block_given_no_mask_applies_none():
    """HAT's HAB applies the attn_mask it is given when shifted; given None it applies no mask at all,
    and so does the fused block (not Swin's mask)."""
    model = _build("HAT", torch.float64)
    block = model.layers[0].residual_group.blocks[1]
    assert block.shift_size > 0
    original = copy.deepcopy(block)
    attnsr.swap_attention(model, backend="torch")
    fused = model.layers[0].residual_group.blocks[1]
    assert isinstance(fused, attnsr.HybridAttentionBlock)
    x = torch.randn(2, 16 * 16, 12, dtype=torch.float64, device=DEVICE)
    rpi = model.relative_position_index_SA
    for backend in ("torch", "triton"):
        fused.attn.backend = backend
        assert_close_rel(fused(x, (16, 16), rpi, None), original(x, (16, 16), rpi, None), torch.float64,
                         f"{backend}: shifted, no mask")


def test_attention_like_modules_that_are_left_say_what_they_are():
    """Nothing attention-like passes silently, and the reason given is true: FDAT's transposed channel
    attention, its window attention with a per-pair bias (not a relative table), the two gate maps of
    its interaction module (an SE gate with GELU, a 1×1 conv and a sigmoid), and its LDA-AQU upsampler
    (deformable attention, not a window attention)."""
    from spandrel.architectures.FDAT import FDAT

    model = FDAT(embed_dim=16, num_groups=1, depth_per_group=2, num_heads=2, window_size=4, mid_dim=16, scale=2,
                 upsampler_type="lda")
    attnsr.swap_attention(model, backend="torch")
    reasons = {name.rsplit(".", 1)[-1] if "inter" in name else cls: why for name, cls, why in model.attnsr_left}
    assert set(reasons) == {"FastChannelAttention", "FastSpatialWindowAttention", "LDA_AQU", "cg", "sg"}, reasons
    assert reasons["cg"].startswith("a squeeze-excitation channel attention with GELU and Sigmoid")
    assert "returns the gate alone" in reasons["cg"], reasons["cg"]
    assert reasons["sg"].startswith("layers with a sigmoid (Conv2d, Sigmoid): values in (0, 1) for the module around")
    assert reasons["FastChannelAttention"].startswith("transposed (channel) attention")
    assert reasons["FastSpatialWindowAttention"].startswith(
        "window attention with a learned bias for each pair of positions in a window (a (2, 16, 16) parameter")
    assert "deformable-attention upsampler" in reasons["LDA_AQU"] and "not a window attention" in reasons["LDA_AQU"]


def test_grl_affine_transform_is_part_of_its_attention_not_an_attention():
    model = _build("GRL", torch.float64)
    attnsr.swap_attention(model, backend="torch")
    assert all(cls != "AffineTransform" for _, cls, _ in model.attnsr_left), model.attnsr_left
    assert {new for _, _, new in model.attnsr_swapped} == {"WindowAttentionV2Map"}


def test_a_training_resolution_that_is_not_whole_windows_does_not_stop_the_swap():
    """HAT's defaults (img_size 64, window 7): the probe runs on two windows a side instead."""
    from spandrel.architectures.HAT import HAT

    model = HAT(img_size=64, window_size=7, embed_dim=12, depths=[2], num_heads=[2], compress_ratio=3,
                squeeze_factor=3, upscale=2, upsampler="pixelshuffle").double().eval()
    attnsr.swap_attention(model, backend="torch")
    assert {new for _, _, new in model.attnsr_swapped} >= {"HybridAttentionBlock", "WindowAttentionRPI"}


def test_channel_gates_in_other_forms_are_named():
    """NAFNet's simplified channel attention (pool, one 1×1 conv, no sigmoid, the product taken by its
    block), an SE gate with GELU (MixDehazeNet's) and DAT's interaction channel map (BatchNorm and GELU,
    no sigmoid) are listed with what they are, not passed over."""
    c = 8
    sca = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(c, c, 1))
    se_gelu = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(c, 2, 1), torch.nn.GELU(),
                                  torch.nn.Conv2d(2, c, 1), torch.nn.Sigmoid())
    # DAT's interaction channel map: BatchNorm and GELU between the layers, its sigmoid taken outside
    aim = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(c, 2, 1), torch.nn.BatchNorm2d(2),
                              torch.nn.GELU(), torch.nn.Conv2d(2, c, 1))
    model = torch.nn.Sequential(torch.nn.ModuleDict({"sca": sca}), torch.nn.ModuleDict({"se": se_gelu}),
                                torch.nn.ModuleDict({"aim": aim}))
    attnsr.swap_attention(model, backend="torch")
    assert model.attnsr_swapped == []
    reasons = {name: why for name, _, why in model.attnsr_left}
    assert reasons["0.sca"].startswith("simplified channel attention (NAFNet's SCA"), reasons
    assert reasons["1.se"].startswith("a squeeze-excitation channel attention with GELU and Sigmoid"), reasons
    assert "returns the gate alone" in reasons["1.se"], reasons
    assert reasons["2.aim"].startswith("a channel map without a gate (average pool, two 1×1 layers C → h → C, a "
                                       "BatchNorm2d and a GELU, no sigmoid"), reasons


def test_crafts_block_applies_the_masks_it_is_given_and_refuses_a_foreign_index():
    """CRAFT's shifted SRWAB masks nothing when given no mask (CRAFT's own call); given a mask per
    half it adds them as they are, and the fused block does the same: output and every gradient
    equal to the block's, float64, on both backends. An index other than Swin's is refused."""
    model = _build("CRAFT", torch.float64)
    original = model.layers[0].residual_group.srwa_blocks[1]  # the shifted block
    assert any(original.shift_size)
    holder = torch.nn.ModuleDict({"block": copy.deepcopy(original)})
    attnsr.swap_attention(holder, backend="torch")
    fused = holder["block"]
    assert isinstance(fused, attnsr.RectWindowBlock) and fused.shifted
    params = {"rpi_sa_h": model.relative_position_index_h, "rpi_sa_v": model.relative_position_index_v,
              "biases_h": model.biases_h, "biases_v": model.biases_v}
    h, w = 8, 16
    windows = h * w // 32  # 4×8 and 8×4 windows: 32 tokens, 4 windows a half
    gen = torch.Generator().manual_seed(5)
    masks = tuple(torch.randn(windows, 32, 32, generator=gen, dtype=torch.float64).to(DEVICE) * 4 for _ in (0, 1))
    x = torch.randn(1, h * w, 64, generator=gen, dtype=torch.float64).to(DEVICE)

    def run(module, mask):
        module.zero_grad()
        xg = x.clone().requires_grad_()
        y = module(xg, (h, w), params, mask)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)).sum().backward()
        return y, xg.grad, torch.cat([p.grad.flatten() for p in module.parameters()])

    for mask in ((None, None), masks):  # (the triton backend without masks: the fp32 test of the whole model)
        want = run(original, mask)
        for backend in ("torch", "triton") if mask[0] is not None else ("torch",):
            fused.backend = backend
            for got, ref, what in zip(run(fused, mask), want, ("output", "d(x)", "parameter gradients")):
                assert_close_rel(got, ref, torch.float64, f"{backend}, masks {mask[0] is not None}: {what}")
    foreign = dict(params, rpi_sa_v=params["rpi_sa_v"].flip(0))
    with pytest.raises(ValueError, match=r"index of half 1 is not Swin's for a \(8, 4\) window"):
        fused(x, (h, w), foreign, (None, None))
