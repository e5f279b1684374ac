"""attnsr layers: every backend matches `naive` (the documents' code, written independently of
attnsr.kernels.reference) in float64, forward and every gradient; one set of parameters and
state_dict keys across backends."""

import copy
import importlib

import pytest
import torch
from conftest import DEVICE
from tolerances import REL_TOL, assert_close_rel

import attnsr
from attnsr import backends
from attnsr.kernels import window_attention

BACKENDS = ["torch", "triton"]

LAYERS = {
    "self_attention": (lambda: attnsr.SelfAttention2d(12), (2, 12, 7, 9)),
    "self_attention_narrow": (lambda: attnsr.SelfAttention2d(10, 6, kernel_size=1), (1, 10, 5, 6)),
    "self_attention_heads_patches": (lambda: attnsr.SelfAttention2d(8, 12, heads=3, patch_size=2), (2, 8, 6, 10)),
    "channel_avg": (lambda: attnsr.ChannelAttention(20, 4), (3, 20, 7, 9)),
    "channel_avgmax": (lambda: attnsr.ChannelAttention(20, 4, pool="avgmax"), (1, 20, 5, 11)),
    "channel_silu": (lambda: attnsr.ChannelAttention(12, 3, act="silu"), (2, 12, 5, 6)),
    "spatial_pool_k3": (lambda: attnsr.SpatialAttention(3), (3, 6, 9, 7)),
    "spatial_pool_k7_bias": (lambda: attnsr.SpatialAttention(7, bias=True), (1, 5, 8, 6)),
    "spatial_conv": (lambda: attnsr.SpatialAttention(7, mode="conv", channels=6), (2, 6, 9, 8)),
    "cbam": (lambda: attnsr.CBAM(24, 8, 7), (2, 24, 7, 10)),
}


def _run(layer, x, backend):
    """Output, input gradient and parameter gradients of layer(x) on one backend, same upstream grad."""
    layer.backend = backend
    layer.zero_grad()
    x = x.detach().requires_grad_()
    y = layer(x)
    gen = torch.Generator(y.device).manual_seed(1)
    grad = torch.randn(y.shape, dtype=torch.float64, device=y.device, generator=gen).to(y.dtype)
    y.backward(grad)
    return [y, x.grad] + [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [n for n in LAYERS if n != "spatial_conv"])
def test_layer_backends_match_naive_float64(name, backend):
    """Not spatial_conv: its conv mode is one PyTorch expression on every backend (nothing to compare;
    test_spatial_conv_mode_is_the_documents_gate checks it against its formula)."""
    build, shape = LAYERS[name]
    layer = build().to(DEVICE, torch.float64)
    x = torch.randn(shape, device=DEVICE, dtype=torch.float64)
    want = _run(layer, x, "naive")
    got = _run(layer, x, backend)
    names = ["output", "d(input)"] + [f"d({n})" for n, _ in layer.named_parameters()]
    for n, g, w in zip(names, got, want):
        assert_close_rel(g, w, torch.float64, f"{name} {backend}: {n}")


def test_spatial_conv_mode_is_the_documents_gate():
    """mode="conv": x · sigmoid(conv(x)) with a bias, a C → 1 convolution of the features themselves."""
    build, shape = LAYERS["spatial_conv"]
    layer = build().to(DEVICE, torch.float64)
    x = torch.randn(shape, device=DEVICE, dtype=torch.float64)
    w, b = layer.conv.weight, layer.conv.bias
    assert w.shape == (1, shape[1], 7, 7) and b is not None
    want = x * torch.sigmoid(torch.nn.functional.conv2d(x, w, b, padding=3))
    for backend in ["naive", *BACKENDS]:
        layer.backend = backend
        assert_close_rel(layer(x), want, torch.float64, f"spatial conv mode on {backend}")


@pytest.mark.parametrize("name", ["self_attention_heads_patches", "cbam"])
def test_layer_triton_float32_and_channels_last(name):
    build, shape = LAYERS[name]
    layer = build().to(DEVICE)
    x = torch.randn(shape, device=DEVICE).contiguous(memory_format=torch.channels_last)
    want = _run(layer.double(), x.double(), "naive")
    got = _run(layer.float(), x, "triton")
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close_rel(g, w, torch.float32, f"{name} fp32 channels_last: tensor {i}", tol=10 * REL_TOL[torch.float32])


def test_naive_backend_is_an_independent_writing(monkeypatch):
    """The layers' comparisons with ``naive`` can fail only if naive is not the code under test:
    with every reference function of attnsr.kernels.reference broken, naive still runs (it is the
    documents' module code), while torch, which runs the reference, breaks."""
    reference = importlib.import_module("attnsr.kernels.reference")

    def broken(*args, **kwargs):
        raise AssertionError("the naive backend called attnsr.kernels.reference")

    for name in ("channel_gate_ref", "spatial_gate_ref", "cbam_gate_ref", "layer_fusion_ref", "image_attention_ref",
                 "flash_attention_ref"):
        monkeypatch.setattr(reference, name, broken)
    for name in ("channel_avgmax", "spatial_pool_k3", "cbam", "self_attention"):
        build, shape = LAYERS[name]
        layer = build()
        layer.backend = "naive"
        assert torch.isfinite(layer(torch.randn(shape))).all()
        if name != "self_attention":  # torch's attention is SDPA, not the reference
            layer.backend = "torch"
            with pytest.raises(AssertionError, match=r"called attnsr\.kernels\.reference"):
                layer(torch.randn(shape))
    fusion = attnsr.LayerAttention(2, 4, backend="naive")
    assert torch.isfinite(fusion([torch.randn(1, 4, 3, 3)] * 2)).all()


def test_layer_attention_backends_match():
    layer = attnsr.LayerAttention(3, 10, reduction=4).to(DEVICE, torch.float64)
    maps = [torch.randn(2, 10, 5, 7, device=DEVICE, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    results = {}
    for backend in ["naive", *BACKENDS]:
        layer.backend = backend
        layer.zero_grad()
        y = layer(maps)
        grads = torch.autograd.grad((y * y).sum(), [*maps, *layer.parameters()])
        results[backend] = [y, *grads]
    for backend in BACKENDS:
        for i, (g, w) in enumerate(zip(results[backend], results["naive"])):
            assert_close_rel(g, w, torch.float64, f"LayerAttention {backend}: tensor {i}")
    weights = layer.layer_weights(maps)
    assert weights.shape == (2, 3)
    assert torch.allclose(weights.sum(1), torch.ones(2, device=DEVICE, dtype=torch.float64))


@pytest.mark.parametrize("name", list(LAYERS))
def test_state_dict_round_trip_across_backends(name):
    build, shape = LAYERS[name]
    src = build()
    src.backend = "triton"
    dst = build()
    dst.backend = "naive"
    assert list(src.state_dict()) == list(dst.state_dict())
    dst.load_state_dict(src.state_dict())
    x = torch.randn(shape)
    src.backend = dst.backend = "torch"
    assert torch.equal(src(x), dst(x))


def test_self_attention_loads_document_checkpoint():
    """A state_dict of the document's block (conv_q, conv_k, conv_v, conv_out) loads as is."""
    doc = {f"conv_{n}.{kind}": torch.randn(shape) for n in "qkv" for kind, shape in
           (("weight", (8, 8, 3, 3)), ("bias", (8,)))}
    doc.update({"conv_out.weight": torch.randn(8, 8, 1, 1), "conv_out.bias": torch.randn(8)})
    layer = attnsr.SelfAttention2d(8)
    layer.load_state_dict(dict(doc))
    assert torch.equal(layer.qkv.weight[8:16], doc["conv_k.weight"])
    assert torch.equal(layer.out.bias, doc["conv_out.bias"])


def test_self_attention_default_scale_follows_document():
    assert attnsr.SelfAttention2d(64, 32).scale == pytest.approx(64**-0.5)  # 1/sqrt(in_channels)
    assert attnsr.SelfAttention2d(8, 12, heads=3, patch_size=2).scale == pytest.approx(16**-0.5)  # 1/sqrt(D)


def test_auto_backend_resolves_by_device():
    x = torch.zeros(1)
    assert backends.resolve("auto", x) == "torch"
    assert backends.resolve("triton", x) == "triton"
    if torch.cuda.is_available():
        assert backends.resolve("auto", x.cuda()) == "triton"


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: attnsr.SelfAttention2d(8, heads=3), r"heads = 3 does not divide out_channels = 8"),
        (lambda: attnsr.SelfAttention2d(8, backend="cuda"), r"backend must be one of .* got 'cuda'"),
        (lambda: attnsr.ChannelAttention(8, pool="max"), r"pool must be 'avg' or 'avgmax', got 'max'"),
        (lambda: attnsr.ChannelAttention(8, act="tanh"), r"act must be 'relu', 'gelu' or 'silu', got 'tanh'"),
        (lambda: attnsr.SpatialAttention(4), r"kernel_size must be odd"),
        (lambda: attnsr.SpatialAttention(7, mode="conv"), r"mode='conv' needs channels="),
    ],
)
def test_layers_reject_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_layer_attention_rejects_wrong_count():
    layer = attnsr.LayerAttention(3, 4)
    with pytest.raises(ValueError, match=r"got 2 feature maps; expected num_layers = 3"):
        layer([torch.randn(1, 4, 2, 2)] * 2)


# ----------------------------------------------------------------------------------------------
# Autocast: one rule for every backend
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*LAYERS, "layer_attention"])
def test_autocast_gives_one_dtype_on_every_backend(name):
    """Inside torch.autocast(bfloat16) an fp32 input gives the same output dtype on naive, torch and
    triton: bfloat16 (the ops compute in the autocast dtype), except SelfAttention2d, whose residual
    add promotes back to the input's float32 on every backend. Values stay within bf16 tolerance of
    the float64 layer."""
    if name == "layer_attention":
        layer = attnsr.LayerAttention(3, 6, reduction=2).to(DEVICE)
        x = [torch.randn(2, 6, 5, 7, device=DEVICE) for _ in range(3)]
        expect = _double(layer, "naive")([t.double() for t in x])
    else:
        build, shape = LAYERS[name]
        layer = build().to(DEVICE)
        x = torch.randn(shape, device=DEVICE)
        expect = _double(layer, "naive")(x.double())
    want = torch.float32 if name.startswith("self_attention") else torch.bfloat16
    for backend in ["naive", "torch", "triton"]:
        layer.backend = backend
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == want, f"{name} on {backend} under bf16 autocast: {y.dtype}, expected {want}"
        assert_close_rel(y, expect, torch.bfloat16, f"{name} on {backend} under bf16 autocast")


def _double(layer, backend):
    twin = copy.deepcopy(layer).double()
    twin.backend = backend
    return twin


@pytest.mark.parametrize("op", ["channel_gate", "spatial_gate", "cbam_gate", "layer_fusion", "attention",
                                "window_attention"])
def test_direct_op_calls_follow_autocast(op):
    """torch.ops.attnsr.* called directly inside autocast casts its fp32 inputs like the public functions."""
    x = torch.randn(2, 4, 5, 6, device=DEVICE)
    w = [torch.randn(s, device=DEVICE) for s in ((2, 4), (2,), (4, 2), (4,))]
    conv = torch.randn(1, 2, 3, 3, device=DEVICE)
    t = torch.randn(2, 4, 6, 6, device=DEVICE)
    args = {
        "channel_gate": (x, *w, "avgmax", "relu"),
        "spatial_gate": (x, conv, None),
        "cbam_gate": (x, *w, conv, None, "avgmax"),
        "layer_fusion": ([x, x.flip(0)], torch.rand(2, 2, device=DEVICE)),
        "attention": (x, x.flip(1), x.flip(2), "map", 2, 1, 0.5, "tf32x3"),
        # (B, H, W, C) maps, a 2×2 window shifted by 1, its (3·3, 2 heads) fp32 bias table
        "window_attention": (t, t.flip(1), t.flip(2), torch.randn(9, 2, device=DEVICE), None, [2, 2], [1, 1], 2,
                             0.5, True),
    }[op]
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = getattr(torch.ops.attnsr, op)(*args)
    y = out if isinstance(out, torch.Tensor) else out[0]
    assert y.dtype == torch.bfloat16, f"torch.ops.attnsr.{op} under bf16 autocast returned {y.dtype}"
    if op == "window_attention":  # the same as the public function, whose table stays fp32
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            want = window_attention(t, t.flip(1), t.flip(2), window_size=2, shift_size=1, heads=2,
                                    bias_table=args[3], scale=0.5)
        assert torch.equal(y, want)


# ----------------------------------------------------------------------------------------------
# torch.compile(dynamic=True) over the layers
# ----------------------------------------------------------------------------------------------

COMPILED = {  # batch and sizes ≥ 2 throughout: PyTorch specialises a size of 0 or 1 (a new graph by design)
    "self_attention_heads_patches": [(2, 8, 6, 10), (3, 8, 4, 6)],
    "channel_avgmax": [(2, 20, 5, 11), (3, 20, 7, 6)],
    "spatial_pool_k3": [(3, 6, 9, 7), (2, 6, 5, 12)],
    "cbam": [(2, 24, 7, 10), (3, 24, 6, 5)],
}


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("name", list(COMPILED))
def test_torch_compile_dynamic_shapes(name, compiler):
    """torch.compile(dynamic=True, fullgraph=True) of a layer on the triton backend: the fake kernels
    trace with symbolic sizes, and two input sizes run through one graph, forward and backward, with
    the eager results (aot_eager: Dynamo and AOTAutograd without code generation; inductor: the
    layer's PyTorch code around the ops compiled too)."""
    build, _ = LAYERS[name]
    layer = build().to(DEVICE)
    layer.backend = "triton"
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=compiler, dynamic=True, fullgraph=True)
    # the second size reuses the graph; except that Inductor's own lowering of a convolution's
    # backward (SelfAttention2d's q, k, v convs) guards on the map's sizes (PyTorch 2.13)
    strict = not (compiler == "inductor" and name.startswith("self_attention"))
    with torch._dynamo.config.patch(error_on_recompile=strict):
        for shape in COMPILED[name]:
            x = torch.randn(shape, device=DEVICE)
            want = _run(layer, x, "triton")
            got = _run(compiled, x, "triton")
            for i, (g, w) in enumerate(zip(got, want)):
                assert_close_rel(g, w, torch.float32, f"{name} compiled with {compiler}, {shape}: tensor {i}")


def test_torch_compile_dynamic_layer_attention():
    layer = attnsr.LayerAttention(3, 6, reduction=2, backend="triton").to(DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", dynamic=True, fullgraph=True)
    for shape in [(2, 6, 5, 7), (1, 6, 4, 9)]:
        maps = [torch.randn(shape, device=DEVICE) for _ in range(3)]
        assert_close_rel(compiled(maps), layer(maps), torch.float32, f"LayerAttention compiled, {shape}")
