"""layer_fusion against the float64 reference: output and the gradients of every map and the weights,
for a stacked (L, B, C, H, W) tensor and for a sequence of maps (no stacking copy)."""

import importlib

import pytest
import torch
from conftest import DEVICE, needs_gpu
from gating_checks import LaunchLog, check_op, leaf
from tolerances import assert_close_rel

from attnsr.kernels import layer_fusion
from attnsr.kernels.reference import layer_fusion_ref

lf_module = importlib.import_module("attnsr.kernels.layer_fusion")


def _stacked(features, weights):
    return layer_fusion(features, weights)


def _stacked_ref(features, weights):
    return layer_fusion_ref(features, weights)


def _seq(weights, *maps):
    return layer_fusion(list(maps), weights)


def _seq_ref(weights, *maps):
    return layer_fusion_ref(list(maps), weights)


# (L, B, C, H, W): L = 1 and 4, B = 1 and 3, C = 1 and not a power of two, H != W, H·W not a
# multiple of the 32-pixel interpreter block; and exact block multiples (16 channels, 8×8 and the
# common 64×64 pixels).
SHAPES = [(1, 1, 5, 7, 9), (4, 3, 12, 13, 11), (3, 2, 1, 6, 5), (2, 1, 19, 4, 3), (2, 2, 16, 8, 8),
          (2, 1, 16, 64, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_fusion_stacked(shape, dtype):
    features = leaf(shape, dtype)
    weights = leaf((shape[1], shape[0]), dtype)
    check_op(_stacked, _stacked_ref, [features, weights], dtype, f"stacked {shape}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
def test_layer_fusion_sequence(shape, dtype):
    n_maps, *dims = shape
    maps = [leaf(tuple(dims), dtype) for _ in range(n_maps)]
    weights = leaf((dims[0], n_maps), dtype)
    _, grads = check_op(_seq, _seq_ref, [weights, *maps], dtype, f"sequence {shape}")
    assert all(g.shape == m.shape for g, m in zip(grads[1:], maps))


def test_layer_fusion_sequence_mixed_layouts():
    """Maps with different strides each (NCHW, channels_last, a slice view): per-map stride table."""
    dims = (3, 12, 13, 11)
    base = torch.randn(3, 12, 15, 14, device=DEVICE)
    maps = [
        leaf(dims, torch.float32),
        leaf(dims, torch.float32, channels_last=True),
        base[:, :, 1:14, 2:13].requires_grad_(),  # a slice: strides of (3, 12, 15, 14)
    ]
    weights = leaf((3, 3), torch.float32)
    _, grads = check_op(_seq, _seq_ref, [weights, *maps], torch.float32, "mixed layouts")
    assert grads[2].is_contiguous(memory_format=torch.channels_last)  # each gradient laid out like its map


def test_layer_fusion_channels_last_sequence():
    """All maps channels_last (shared strides): output and gradients stay channels_last."""
    maps = [leaf((2, 12, 5, 7), torch.float32, channels_last=True) for _ in range(3)]
    out, grads = check_op(_seq, _seq_ref, [leaf((2, 3), torch.float32), *maps], torch.float32, "cl")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert all(g.is_contiguous(memory_format=torch.channels_last) for g in grads[1:])


def test_layer_fusion_pixel_addressing_and_alignment():
    """Maps whose pixels lie in one run are addressed flat (the kernels get W = 1: unit stride,
    wide loads); a cropped map keeps its rows. Wide loads are allowed only
    when every map starts on 16 bytes (the maps are launch arguments, so Triton's specialisation of
    16-byte-aligned pointers tells the compiler): maps offset by one element are read correctly."""
    from attnsr.kernels._gating import PixelRun

    nchw = torch.randn(2, 4, 5, 6, device=DEVICE)
    cropped = torch.randn(2, 4, 5, 8, device=DEVICE)[..., 1:7]
    run = PixelRun(6, nchw, nchw.contiguous(memory_format=torch.channels_last), nchw[:, 1:3])
    assert (run.flat, run.width, run.strides(nchw)) == (True, 1, (120, 30, 1, 1))
    assert (PixelRun(6, nchw, cropped).width, PixelRun(6, nchw, cropped).strides(cropped)) == (6, (160, 40, 8, 1))

    dims = (2, 4, 5, 6)
    maps = [torch.randn(1 + 240, device=DEVICE)[1:].view(dims).requires_grad_() for _ in range(3)]
    assert all(m.data_ptr() % 16 for m in maps)
    check_op(_seq, _seq_ref, [leaf((2, 3), torch.float32), *maps], torch.float32, "offset maps")


def test_layer_fusion_stacked_views_and_expanded_grad():
    """A stacked tensor that is a permuted view (L is not the outer dimension in memory), weights
    as a transposed view, and an upstream gradient with stride 0."""
    features = torch.randn(3, 4, 6, 5, 7, device=DEVICE).transpose(0, 1).requires_grad_()  # (L=4, B=3, ...)
    weights = torch.randn(4, 3, device=DEVICE).t().requires_grad_()  # (B=3, L=4), non-contiguous
    grad = torch.ones(1, 1, 1, 1, device=DEVICE).expand(3, 6, 5, 7)
    _, (dfeatures, _) = check_op(_stacked, _stacked_ref, [features, weights], torch.float32, "views", grad=grad)
    assert dfeatures.shape == features.shape


def test_layer_fusion_gradient_subsets():
    """Only the weights, or only some maps, require grad: the others get None."""
    maps = [leaf((2, 3, 4, 5), torch.float32) for _ in range(3)]
    maps[1].requires_grad_(False)
    weights = leaf((2, 3), torch.float32)
    out = layer_fusion(maps, weights)
    g0, g2, gw = torch.autograd.grad(out, (maps[0], maps[2], weights), torch.ones_like(out))
    ref = torch.autograd.grad(layer_fusion_ref(maps, weights), (maps[0], maps[2], weights), torch.ones_like(out))
    for got, want in zip((g0, g2, gw), ref):
        torch.testing.assert_close(got, want)
    frozen = [m.detach() for m in maps]
    (gw_only,) = torch.autograd.grad(layer_fusion(frozen, weights), weights, torch.ones_like(out))
    torch.testing.assert_close(gw_only, ref[2])


def test_layer_fusion_gradcheck():
    features = leaf((3, 2, 3, 2, 3), torch.float64)
    weights = leaf((2, 3), torch.float64)
    assert torch.autograd.gradcheck(_stacked, (features, weights))
    maps = [leaf((2, 3, 2, 3), torch.float64) for _ in range(2)]
    assert torch.autograd.gradcheck(_seq, (leaf((2, 2), torch.float64), *maps), fast_mode=True)


def test_layer_fusion_pass_counts(monkeypatch):
    """Forward reads the L maps once (one launch over the stacked tensor) and writes the output
    once; backward reads dout and the maps once and writes the gradients once."""
    log = LaunchLog(monkeypatch, [lf_module])
    features = leaf((4, 2, 5, 7, 9), torch.float32)
    weights = leaf((2, 4), torch.float32)
    out = layer_fusion(features, weights)
    log.watch("features", features)
    log.watch("out", out)
    assert (log.count("features"), log.count("out"), len(log.launches)) == (1, 1, 1)
    log.clear()
    dout = torch.randn_like(out)
    dfeatures, _ = torch.autograd.grad(out, (features, weights), dout)
    log.watch("dout", dout)
    log.watch("dfeatures", dfeatures)
    assert (log.count("dout"), log.count("features"), log.count("dfeatures"), len(log.launches)) == (1, 1, 1, 1)


def test_layer_fusion_sequence_copies_nothing_to_the_device(monkeypatch):
    """The maps of a sequence reach the kernels as launch arguments: no tensor is built from host
    values (a pointer table copied host → device on every call stalls on pageable memory and is not
    allowed inside CUDA-graph capture), and each launch receives the maps themselves."""
    built = []
    tensor = torch.tensor

    def spy(data, *args, **kwargs):
        built.append(data)
        return tensor(data, *args, **kwargs)

    log = LaunchLog(monkeypatch, [lf_module])
    maps = [leaf((2, 5, 7, 9), torch.float32, channels_last=i == 1) for i in range(3)]  # strides differ
    weights = leaf((2, 3), torch.float32)
    monkeypatch.setattr(torch, "tensor", spy)
    out = layer_fusion(maps, weights)
    grads = torch.autograd.grad(out, [*maps, weights], torch.randn_like(out))
    monkeypatch.setattr(torch, "tensor", tensor)
    assert built == [], f"layer_fusion built {len(built)} tensor(s) from host values: {built}"
    for i, m in enumerate(maps):
        log.watch(f"map {i}", m)
        log.watch(f"grad {i}", grads[i])
        assert (log.count(f"map {i}"), log.count(f"grad {i}")) == (2, 1), f"launches given map {i} / its gradient"
    assert len(log.launches) == 2
    check_op(_seq, _seq_ref, [weights, *maps], torch.float32, "sequence of three layouts")


@needs_gpu
def test_layer_fusion_sequence_in_a_cuda_graph():
    """A launch on a sequence of maps is captured in a CUDA graph and replays on new contents."""
    maps = [torch.randn(2, 8, 16, 12, device=DEVICE) for _ in range(3)]
    maps[2] = maps[2].contiguous(memory_format=torch.channels_last)
    weights = torch.rand(2, 3, device=DEVICE).softmax(1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer_fusion(maps, weights)  # compiles the kernel outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer_fusion(maps, weights)
    for t in (*maps, weights):
        t.copy_(torch.rand_like(t))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_rel(out, layer_fusion_ref(maps, weights, upcast=True), torch.float32, "replayed graph")


@needs_gpu
def test_layer_attention_under_reduce_overhead_compile():
    """torch.compile(mode="reduce-overhead") runs the fused fusion inside CUDA graphs, fwd + bwd."""
    import attnsr

    layer = attnsr.LayerAttention(3, 8, reduction=2, backend="triton").to(DEVICE)
    compiled = torch.compile(layer, mode="reduce-overhead")
    for _ in range(3):
        maps = [torch.randn(2, 8, 16, 12, device=DEVICE, requires_grad=True) for _ in range(3)]
        got = compiled(maps)
        (g,) = torch.autograd.grad(got.square().sum(), maps[0])
        want = layer(maps)
        (w,) = torch.autograd.grad(want.square().sum(), maps[0])
        assert_close_rel(got, want, torch.float32, "compiled output")
        assert_close_rel(g, w, torch.float32, "compiled d(map 0)")


def test_layer_fusion_bad_input():
    maps = [leaf((2, 3, 4, 5), torch.float32) for _ in range(3)]
    weights = leaf((2, 3), torch.float32)
    with pytest.raises(ValueError, match=r"weights is \(2, 4\) but features has L = 3 maps of batch B = 2"):
        layer_fusion(maps, leaf((2, 4), torch.float32))
    with pytest.raises(ValueError, match=r"weights is \(3, 3\) but features has L = 3 maps of batch B = 2"):
        layer_fusion(torch.stack(maps), leaf((3, 3), torch.float32))
    with pytest.raises(ValueError, match=r"features\[0\] is \(2, 3, 4, 5\) but features\[2\] is \(2, 3, 4, 6\)"):
        layer_fusion([*maps[:2], leaf((2, 3, 4, 6), torch.float32)], weights)
    with pytest.raises(TypeError, match=r"features\[0\] is torch.float32 but features\[1\] is torch.float16"):
        layer_fusion([maps[0], maps[1].half(), maps[2]], weights)
    with pytest.raises(TypeError, match=r"features is torch.float32 but weights is torch.float64"):
        layer_fusion(torch.stack(maps), weights.double())
    with pytest.raises(ValueError, match=r"features is on cpu but weights is on meta"):
        layer_fusion(torch.stack(maps).cpu(), weights.to("meta"))
    with pytest.raises(ValueError, match=r"features is an empty list; expected L ≥ 1 maps"):
        layer_fusion([], weights)
    with pytest.raises(ValueError, match=r"features has 4 dims, shape \(2, 3, 4, 5\); expected 5 dims"):
        layer_fusion(maps[0], weights)
    with pytest.raises(TypeError, match=r"features must be a \(L, B, C, H, W\) tensor or a list/tuple"):
        layer_fusion((m for m in maps), weights)
    with pytest.raises(ValueError, match=r"weights has 1 dims"):
        layer_fusion(maps, weights[0])


def test_layer_fusion_empty_batch_and_empty_maps():
    out = layer_fusion(leaf((3, 0, 4, 2, 5), torch.float32), leaf((0, 3), torch.float32))
    assert out.shape == (0, 4, 2, 5)
    with pytest.raises(ValueError, match=r"each map \(B, C, H, W\) is \(2, 4, 0, 5\); expected C, H and W"):
        layer_fusion(leaf((3, 2, 4, 0, 5), torch.float32), leaf((2, 3), torch.float32))
