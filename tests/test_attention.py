"""flash_attention and image_attention against the float64 reference: forward and every gradient."""

import contextlib

import pytest
import torch
from conftest import DEVICE, ON_GPU, needs_gpu
from tolerances import FP32_PRECISION_TOL, REL_TOL, assert_close_rel, rel_error

from attnsr.kernels import flash_attention, image_attention, image_attention_qkv
from attnsr.kernels._runtime import dot_precision
from attnsr.kernels.reference import (
    flash_attention_ref,
    image_attention_ref,
    image_to_tokens,
    tokens_to_image,
)

DTYPES = [torch.float32, torch.float16]
# the backward's two modes: the one-pass backward (atomic dQ, the default) and the deterministic
# one (torch.use_deterministic_algorithms(True))
MODES = ["one-pass", "deterministic"]


@contextlib.contextmanager
def backward_mode(mode):
    """PyTorch's deterministic-algorithms flag as ``mode`` asks; restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(mode == "deterministic")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.fixture(params=MODES)
def mode(request):
    with backward_mode(request.param):
        yield request.param


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad)


def check_against_reference(fn, ref, inputs, dtype, what, tol=None):
    """Output and the gradient of every input against the float64 reference, same upstream grad."""
    out = fn(*inputs)
    expect = ref(*inputs)
    assert out.dtype == dtype
    assert_close_rel(out, expect, dtype, f"{what}: output", tol)
    grad = torch.randn_like(out)
    got = _grads(out, inputs, grad)
    want = _grads(expect, inputs, grad.double())
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == dtype
        assert_close_rel(g, w, dtype, f"{what}: d{name}", tol)


def _leaf(shape, dtype, scale=1.0):
    return (torch.randn(shape, device=DEVICE, dtype=torch.float64) * scale).to(dtype).requires_grad_()


# ----------------------------------------------------------------------------------------------
# flash_attention: (B, H, N, D)
# ----------------------------------------------------------------------------------------------

# (B, H, N, M, D): one token, odd N, N != M, more than one block (32 under the interpreter) past
# an edge, non-power-of-two head dims, and the head-dim extremes 1 and 256.
SEQ_SHAPES = [
    (1, 1, 1, 1, 8),
    (2, 1, 7, 7, 20),
    (1, 2, 70, 33, 64),
    (2, 3, 33, 70, 108),
    (1, 1, 130, 130, 32),
    (2, 2, 9, 5, 1),
    (1, 1, 5, 40, 256),
    (1, 2, 64, 128, 32),  # exact multiples of the blocks (32 under the interpreter, 32 or 64 on a GPU)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SEQ_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_flash_attention_matches_reference(shape, dtype, mode):
    b, h, n, m, d = shape
    q, k, v = _leaf((b, h, n, d), dtype), _leaf((b, h, m, d), dtype), _leaf((b, h, m, d), dtype)
    ref = lambda q, k, v: flash_attention_ref(q, k, v, upcast=True)  # noqa: E731
    check_against_reference(flash_attention, ref, (q, k, v), dtype, f"flash {shape}")


def test_flash_attention_non_contiguous_views(mode):
    """Transposed and sliced inputs are read through their strides, not copied."""
    base = torch.randn(2, 40, 3, 3, 24, device=DEVICE, dtype=torch.float32)
    q, k, v = (base[:, :, i, :, :20].transpose(1, 2).requires_grad_() for i in range(3))  # (2, 3, 40, 20)
    assert not q.is_contiguous()
    ref = lambda q, k, v: flash_attention_ref(q, k, v, upcast=True)  # noqa: E731
    check_against_reference(flash_attention, ref, (q, k, v), torch.float32, "flash views")


def test_flash_attention_explicit_scale():
    q, k, v = (_leaf((1, 2, 37, 16), torch.float32) for _ in range(3))
    fn = lambda q, k, v: flash_attention(q, k, v, scale=0.7)  # noqa: E731
    ref = lambda q, k, v: flash_attention_ref(q, k, v, scale=0.7, upcast=True)  # noqa: E731
    check_against_reference(fn, ref, (q, k, v), torch.float32, "flash scale=0.7")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flash_attention_large_logits_stay_finite(dtype):
    """Inputs ×30: logits in the hundreds to thousands. The online softmax must not overflow.

    Such inputs are ill-conditioned, so the bound is relative to PyTorch in the same dtype:
    the forward against its plain softmax maths; the gradients against its SDPA, the same kind of
    algorithm (the backward recomputes P from a saved log-sum-exp and uses Δ = rowsum(dO·O), whose
    rounding grows with the logits for any flash backward).
    """
    q, k, v = (_leaf((1, 2, 45, 20), dtype, scale=30.0) for _ in range(3))
    out = flash_attention(q, k, v)
    assert torch.isfinite(out).all()
    expect = flash_attention_ref(q, k, v, upcast=True)
    plain = flash_attention_ref(q, k, v)
    err, err_torch = rel_error(out, expect), rel_error(plain, expect)
    assert err <= 2 * err_torch + REL_TOL[dtype], f"output: error {err:.3e} vs torch {err_torch:.3e}"
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    grad = torch.randn_like(out)
    got = _grads(out, (q, k, v), grad)
    want = _grads(expect, (q, k, v), grad.double())
    base = _grads(sdpa, (q, k, v), grad)
    for name, g, w, t in zip("qkv", got, want, base):
        assert torch.isfinite(g).all(), f"d{name} has non-finite values"
        err, err_torch = rel_error(g, w), rel_error(t, w)
        assert err <= 2 * err_torch + REL_TOL[dtype], f"d{name}: error {err:.3e} vs SDPA {err_torch:.3e}"


# ----------------------------------------------------------------------------------------------
# image_attention: (B, C, H, W)
# ----------------------------------------------------------------------------------------------

# (B, C, H, W, heads, patch): D = C/heads·p², N = (H/p)(W/p)
MAP_SHAPES = [
    (2, 8, 9, 7, 1, 1),  # D 8, N 63
    (1, 20, 6, 6, 1, 1),  # D 20
    (2, 64, 5, 6, 2, 1),  # D 32, two heads
    (1, 8, 10, 13, 2, 1),  # D 4, N 130
    (2, 16, 12, 10, 4, 2),  # D 16, four heads, 2x2 patches
    (1, 12, 6, 9, 3, 3),  # D 36, 3x3 patches
    (1, 27, 4, 6, 1, 2),  # D 108
    (1, 16, 8, 8, 2, 1),  # D 8, N 64: two full interpreter blocks
    (2, 8, 16, 8, 1, 2),  # D 32, N 32 patches: one full block
]
LAYOUTS = ["nchw", "channels_last", "fused_qkv", "fused_qkv_channels_last"]
# every layout in the default (one-pass) mode; the deterministic mode on the plain NCHW maps and on
# the views of a packed channels_last qkv map (the layouts' addressing is the same in both modes)
LAYOUT_MODES = [(layout, "one-pass") for layout in LAYOUTS] + [("nchw", "deterministic"),
                                                               ("fused_qkv_channels_last", "deterministic")]


def _maps(layout, b, c, h, w, dtype):
    """q, k, v leaves in the given layout. Fused: split views of one (B, 3C, H, W) conv output."""
    if layout.startswith("fused"):
        qkv = torch.randn(b, 3 * c, h, w, device=DEVICE, dtype=torch.float64).to(dtype)
        if layout.endswith("channels_last"):
            qkv = qkv.contiguous(memory_format=torch.channels_last)
        qkv.requires_grad_()
        return qkv, qkv.split(c, dim=1)
    maps = [torch.randn(b, c, h, w, device=DEVICE, dtype=torch.float64).to(dtype) for _ in range(3)]
    if layout == "channels_last":
        maps = [t.contiguous(memory_format=torch.channels_last) for t in maps]
    maps = [t.requires_grad_() for t in maps]
    return None, maps


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout, bwd", LAYOUT_MODES, ids=lambda x: x)
@pytest.mark.parametrize("shape", MAP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_image_attention_matches_reference(shape, layout, bwd, dtype):
    qkv, (q, k, v) = _maps(layout, *shape[:4], dtype)
    with backward_mode(bwd):
        _check_image_attention(shape, layout, dtype, qkv, q, k, v)


def _check_image_attention(shape, layout, dtype, qkv, q, k, v):
    b, c, h, w, heads, p = shape
    out = image_attention(q, k, v, heads=heads, patch_size=p)
    expect = image_attention_ref(q, k, v, heads=heads, patch_size=p, upcast=True)
    what = f"image {shape} {layout}"
    assert out.shape == (b, c, h, w)
    assert_close_rel(out, expect, dtype, f"{what}: output")
    if layout.endswith("channels_last"):
        assert out.is_contiguous(memory_format=torch.channels_last), f"{what}: output lost channels_last"
    grad = torch.randn_like(out)
    leaves = (qkv,) if qkv is not None else (q, k, v)
    got = _grads(out, leaves, grad)
    want = _grads(expect, leaves, grad.double())
    for i, (g, wnt) in enumerate(zip(got, want)):
        assert_close_rel(g, wnt, dtype, f"{what}: grad of input {i}")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_image_attention_64x64_map(dtype):
    """The common case, 4096 tokens: an exact multiple of every block size, fused qkv (too slow for
    the interpreter)."""
    qkv, (q, k, v) = _maps("fused_qkv", 2, 64, 64, 64, dtype)
    out = image_attention(q, k, v, heads=2)
    expect = image_attention_ref(q, k, v, heads=2, upcast=True)
    assert_close_rel(out, expect, dtype, "64x64 map: output")
    grad = torch.randn_like(out)
    (g,) = _grads(out, (qkv,), grad)
    (w,) = _grads(expect, (qkv,), grad.double())
    assert_close_rel(g, w, dtype, "64x64 map: d(qkv)")


def test_image_attention_explicit_scale_and_large_inputs():
    qkv = (torch.randn(1, 3 * 12, 6, 8, device=DEVICE) * 30).requires_grad_()
    q, k, v = qkv.split(12, dim=1)
    out = image_attention(q, k, v, heads=2, patch_size=2, scale=0.01)
    expect = image_attention_ref(q, k, v, heads=2, patch_size=2, scale=0.01, upcast=True)
    assert_close_rel(out, expect, torch.float32, "scale=0.01 x30: output")
    grad = torch.randn_like(out)
    (g,) = _grads(out, (qkv,), grad)
    (w,) = _grads(expect, (qkv,), grad.double())
    assert_close_rel(g, w, torch.float32, "scale=0.01 x30: d(qkv)")


def test_image_attention_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = (torch.randn(1, 12, 4, 4, device=DEVICE) for _ in range(3))
    out = image_attention(q, k, v, heads=3, patch_size=2)
    explicit = image_attention(q, k, v, heads=3, patch_size=2, scale=(12 / 3 * 4) ** -0.5)
    assert torch.equal(out, explicit)


def test_upstream_gradient_with_stride_zero():
    """out.sum() sends back an expanded gradient (stride 0 everywhere): it must be read by strides."""
    qkv = torch.randn(2, 3 * 8, 5, 7, device=DEVICE, requires_grad=True)
    out = image_attention(*qkv.split(8, dim=1), heads=2)
    (g,) = torch.autograd.grad(out.sum(), qkv)
    ref = image_attention_ref(*qkv.split(8, dim=1), heads=2, upcast=True)
    (w,) = torch.autograd.grad(ref.sum(), qkv)
    assert_close_rel(g, w, torch.float32, "grad of sum()")


def test_token_rows_are_flattened_only_where_they_lie_in_one_row():
    """Pixels of NCHW / channels_last maps (and stride-0 gradients) are addressed as one row of tokens
    (no division per token); patches and maps whose rows are not contiguous keep the 2-D grid."""
    from attnsr.kernels.attention import _Tokens

    def layout(patch, *maps):
        return _Tokens("map", 1, patch, maps[0].shape[-1]).for_tensors(*maps)

    nchw = torch.randn(2, 6, 5, 7)
    cl = nchw.contiguous(memory_format=torch.channels_last)
    cropped = torch.randn(2, 6, 5, 10)[..., 1:8]  # row stride 10 for 7 pixels
    everyother = torch.randn(2, 6, 5, 14)[..., ::2]  # evenly spaced pixels: still one row
    expanded = torch.ones(()).expand(2, 6, 5, 7)
    assert layout(1, nchw, cl, everyother, expanded).tw == 1
    assert layout(1, nchw).strides(nchw)[2:4] == (1, 0)
    assert layout(1, cl).strides(cl)[2:4] == (6, 0)
    assert layout(1, nchw, cropped).tw == 7, "a cropped map must keep the token grid"
    assert layout(2, torch.randn(1, 6, 4, 6)).tw == 3, "patches must keep the token grid"
    assert layout(1, nchw, torch.empty(0)).tw == 1, "the (0,) placeholder of a gradient not asked for is ignored"
    for h, w in ((1, 7), (5, 1), (1, 1)):
        m = torch.randn(2, 6, h, w)
        assert layout(1, m).tw == 1, f"a {h}x{w} NCHW map"
        assert layout(1, m.contiguous(memory_format=torch.channels_last)).tw == 1, f"a {h}x{w} channels_last map"


def test_flat_forward_with_a_grid_backward():
    """q, k, v are plain maps (flat rows) but the upstream gradient is a crop of a wider tensor, so
    the backward reads the token grid while the forward did not: gradients against float64."""
    q, k, v = (_leaf((2, 8, 5, 6), torch.float32) for _ in range(3))
    out = image_attention(q, k, v, heads=2)
    expect = image_attention_ref(q, k, v, heads=2, upcast=True)
    grad = torch.randn(2, 8, 5, 9, device=DEVICE)[..., 1:7]
    got = _grads(out, (q, k, v), grad)
    want = _grads(expect, (q, k, v), grad.double())
    for name, g, w in zip("qkv", got, want):
        assert_close_rel(g, w, torch.float32, f"cropped upstream gradient: d{name}")


@pytest.mark.parametrize("patch", [1, 2])
def test_image_attention_on_cropped_maps(patch):
    """q is a crop of a wider map (rows not contiguous), k and v are plain: forward and gradients
    (p = 1: the crop alone takes the call off the flat path; p = 2 reads the grid in any case)."""
    wide = torch.randn(2, 8, 6, 13, device=DEVICE, dtype=torch.float64).float().requires_grad_()
    q = wide[..., 2:12]
    k, v = (_leaf((2, 8, 6, 10), torch.float32) for _ in range(2))
    out = image_attention(q, k, v, heads=2, patch_size=patch)
    expect = image_attention_ref(q, k, v, heads=2, patch_size=patch, upcast=True)
    assert_close_rel(out, expect, torch.float32, f"cropped p{patch}: output")
    grad = torch.randn_like(out)
    got = _grads(out, (wide, k, v), grad)
    want = _grads(expect, (wide, k, v), grad.double())
    for name, g, w in zip(("wide", "k", "v"), got, want):
        assert_close_rel(g, w, torch.float32, f"cropped p{patch}: d{name}")


# ----------------------------------------------------------------------------------------------
# Patches run packed (kernels/pack.py): q, k, v and dO copied into (B, heads, N, D) sequences once,
# out and dq, dk, dv copied back into the maps' layouts
# ----------------------------------------------------------------------------------------------

# (B, C, H, W, heads, patch, layout): odd patch grids; N one past an interpreter block (32),
# N below one block, D not a multiple of 16 (padded rows)
PACKED_SHAPES = [
    (1, 4, 6, 22, 1, 2, "nchw"),  # D 16, N 33
    (2, 6, 9, 15, 2, 3, "channels_last"),  # D 27, N 15, two heads
    (1, 5, 10, 14, 1, 2, "nchw"),  # D 20, N 35
]


@pytest.mark.parametrize("shape", PACKED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_image_attention_qkv_with_patches(shape):
    """image_attention_qkv with patches: the backward unpacks dq, dk, dv into the one gradient
    buffer laid out like qkv (NCHW or channels_last)."""
    b, c, h, w, heads, p, layout = shape
    qkv = torch.randn(b, 3 * c, h, w, device=DEVICE, dtype=torch.float64).float()
    if layout == "channels_last":
        qkv = qkv.contiguous(memory_format=torch.channels_last)
    qkv.requires_grad_()
    out = image_attention_qkv(qkv, heads=heads, patch_size=p)
    expect = image_attention_ref(*qkv.split(c, 1), heads=heads, patch_size=p, upcast=True)
    assert_close_rel(out, expect, torch.float32, f"qkv {shape}: output")
    grad = torch.randn_like(out)
    (g,) = _grads(out, (qkv,), grad)
    (w,) = _grads(expect, (qkv,), grad.double())
    assert g.stride() == qkv.stride(), f"qkv {shape}: the gradient buffer is not laid out like qkv"
    assert_close_rel(g, w, torch.float32, f"qkv {shape}: d(qkv)")


def test_packed_patches_with_some_gradients_and_a_stride_zero_upstream():
    """Only dk wanted (dq is not unpacked), the upstream gradient of .sum() (stride 0: packed by
    strides), q channels_last and k, v NCHW (one pack launch reads three layouts)."""
    q = _leaf((2, 6, 10, 6), torch.float32).detach().contiguous(memory_format=torch.channels_last)
    k = _leaf((2, 6, 10, 6), torch.float32)
    v = _leaf((2, 6, 10, 6), torch.float32).detach()
    out = image_attention(q, k, v, heads=3, patch_size=2)
    assert out.is_contiguous(memory_format=torch.channels_last)
    (g,) = torch.autograd.grad(out.sum(), k)
    (w,) = torch.autograd.grad(image_attention_ref(q, k, v, heads=3, patch_size=2, upcast=True).sum(), k)
    assert_close_rel(g, w, torch.float32, "dk alone, stride-0 upstream")


def test_pack_round_trip_is_the_reference_token_order():
    """pack gives image_to_tokens' (B, heads, N, D) tokens exactly (rows zero-padded to 32
    elements), unpack puts them back bit for bit, for a channels_last map with 3×3 patches and two
    heads."""
    from attnsr.kernels.attention import _Tokens
    from attnsr.kernels.pack import pack, unpack

    x = torch.randn(2, 6, 9, 12, device=DEVICE).contiguous(memory_format=torch.channels_last)
    layout = _Tokens("map", 2, 3, 12)
    (t,) = pack((x,), layout, 12, 27)
    assert t.shape == (2, 2, 12, 32) and t.is_contiguous()
    assert torch.equal(t[..., :27], image_to_tokens(x, heads=2, patch_size=3))
    assert not t[..., 27:].any(), "the padding must be zeros"
    back = torch.full_like(x, float("nan"))
    unpack((t,), (back,), layout, 12, 27)
    assert torch.equal(back, x)


def test_negative_scale_and_partial_key_blocks():
    """A negative scale (the forward's running max is min(qk)·scale on full key blocks), N ≠ M, M
    one past a block edge (32 under the interpreter) and N below one block: output and gradients."""
    q = _leaf((1, 2, 20, 16), torch.float32)
    k, v = (_leaf((1, 2, 33, 16), torch.float32) for _ in range(2))
    check_against_reference(lambda q, k, v: flash_attention(q, k, v, scale=-0.7),
                            lambda q, k, v: flash_attention_ref(q, k, v, scale=-0.7, upcast=True), (q, k, v),
                            torch.float32, "scale -0.7")


def test_small_calls_take_smaller_query_blocks_to_fill_the_sms():
    """The forward's table setting is halved while its programs number fewer than the SMs, down to
    16 rows per warp; large calls and other devices keep it."""
    from attnsr.kernels import _runtime
    from attnsr.kernels import attention as attn

    gpu = torch.device("cuda", 0)
    saved = dict(_runtime._SMS)
    _runtime._SMS[0] = 132  # an H200, without asking a driver
    try:
        def fill(block_m, warps, rows, bh, device=gpu):
            cfg = attn._fill_sms(dict(BLOCK_M=block_m, num_warps=warps), device, rows, bh)
            return cfg["BLOCK_M"], cfg["num_warps"]

        assert fill(128, 4, 4096, 1) == (64, 4)
        assert fill(128, 8, 4096, 1) == (128, 8)  # 16 rows per warp already
        assert fill(128, 4, 4096, 64) == (128, 4)  # 2048 programs: unchanged
        assert fill(64, 1, 1024, 1) == (16, 1)
        assert fill(128, 4, 100, 2, torch.device("cpu")) == (128, 4)
    finally:
        _runtime._SMS.clear()
        _runtime._SMS.update(saved)


def test_deterministic_backward_is_bitwise_reproducible():
    """Under torch.use_deterministic_algorithms(True) every gradient element is written by one
    program in a fixed order: two runs give bitwise-equal gradients (packed qkv: dq, dk and dv
    written into views of one buffer), and they match float64."""
    qkv = torch.randn(2, 3 * 16, 5, 7, device=DEVICE, requires_grad=True)
    grad = torch.randn(2, 16, 5, 7, device=DEVICE)
    runs = []
    with backward_mode("deterministic"):
        for _ in range(2):
            out = image_attention_qkv(qkv, heads=2)
            (g,) = torch.autograd.grad(out, qkv, grad)
            runs.append(g)
    assert torch.equal(runs[0], runs[1]), "two deterministic backward runs differ"
    (w,) = _grads(image_attention_ref(*qkv.split(16, dim=1), heads=2, upcast=True), (qkv,), grad.double())
    assert_close_rel(runs[0], w, torch.float32, "deterministic d(qkv)")


class _Spy:
    """Stands for a kernel: records (name, PROGRAMS, PART) of each launch, then launches it."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, kwargs.get("PROGRAMS"), kwargs.get("PART")))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_backward_mode_follows_use_deterministic_algorithms(dtype, monkeypatch):
    """The one-pass backward (Δ, which also zeroes the dQ sums; the one-pass kernel; for 16-bit dq
    the cast of the fp32 sums) by default; under torch.use_deterministic_algorithms(True) Δ and one
    launch of dK/dV programs followed by dQ programs. A call that needs only dQ, or only dK and dV,
    runs that kind of program alone (no atomics) in either mode."""
    import attnsr.kernels.attention as attn

    log = []
    for name in ("_attn_bwd_delta_kernel", "_attn_bwd_kernel", "_attn_bwd_det_kernel", "_attn_bwd_dq_cast_kernel"):
        monkeypatch.setattr(attn, name, _Spy(getattr(attn, name), name, log))
    q, k, v = (_leaf((1, 2, 40, 16), dtype) for _ in range(3))
    grad = torch.randn(1, 2, 40, 16, device=DEVICE, dtype=dtype)
    ref = _grads(flash_attention_ref(q, k, v, upcast=True), (q, k, v), grad.double())
    one_pass = [("_attn_bwd_delta_kernel", None, None), ("_attn_bwd_kernel", None, 0)]
    if dtype == torch.float16:  # fp32 and float64 sum dQ in dq itself
        one_pass.append(("_attn_bwd_dq_cast_kernel", None, None))
    deterministic = [("_attn_bwd_delta_kernel", None, None), ("_attn_bwd_det_kernel", 0, 0)]
    for mode, expect in (("one-pass", one_pass), ("deterministic", deterministic)):
        log.clear()
        with backward_mode(mode):
            got = _grads(flash_attention(q, k, v), (q, k, v), grad)
        assert log == expect, (mode, log)
        for name, g, w in zip("qkv", got, ref):
            assert_close_rel(g, w, dtype, f"{mode}: d{name}")
        for wanted, programs in (("q", 2), ("kv", 1)):  # only those inputs require a gradient
            args = [t.detach().requires_grad_(name in wanted) for name, t in zip("qkv", (q, k, v))]
            log.clear()
            with backward_mode(mode):
                _grads(flash_attention(*args), [t for t in args if t.requires_grad], grad)
            assert log == [("_attn_bwd_delta_kernel", None, None), ("_attn_bwd_det_kernel", programs, 0)], log


def test_gradcheck_float64():
    q = torch.randn(1, 2, 5, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 4, 3, device=DEVICE, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attention(q, k, v), (q, k, v))
    qkv = torch.randn(1, 3 * 4, 2, 4, device=DEVICE, dtype=torch.float64)
    qkv = qkv.contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: image_attention(*t.split(4, dim=1), heads=2, patch_size=2, scale=0.5), (qkv,)
    )


@needs_gpu
@pytest.mark.parametrize("shape", MAP_SHAPES[:4] + MAP_SHAPES[-1:], ids=lambda s: "x".join(map(str, s)))
def test_image_attention_bfloat16(shape):
    b, c, h, w, heads, p = shape
    qkv, (q, k, v) = _maps("fused_qkv_channels_last", b, c, h, w, torch.bfloat16)
    out = image_attention(q, k, v, heads=heads, patch_size=p)
    expect = image_attention_ref(q, k, v, heads=heads, patch_size=p, upcast=True)
    assert_close_rel(out, expect, torch.bfloat16, "bf16 output")
    grad = torch.randn_like(out)
    (g,) = _grads(out, (qkv,), grad)
    (w,) = _grads(expect, (qkv,), grad.double())
    assert_close_rel(g, w, torch.bfloat16, "bf16 d(qkv)")


@needs_gpu
@pytest.mark.parametrize("shape", SEQ_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_flash_attention_bfloat16(shape):
    b, h, n, m, d = shape
    q, k, v = (_leaf(s, torch.bfloat16) for s in ((b, h, n, d), (b, h, m, d), (b, h, m, d)))
    ref = lambda q, k, v: flash_attention_ref(q, k, v, upcast=True)  # noqa: E731
    check_against_reference(flash_attention, ref, (q, k, v), torch.bfloat16, f"flash bf16 {shape}")


def test_bfloat16_plumbing_under_any_device(mode):
    """bf16 loads, stores and roundings on every device (under the interpreter the dot operands are
    widened to fp32 because its bf16 dot is wrong; on a GPU this is the real bf16 kernel)."""
    qkv, (q, k, v) = _maps("fused_qkv_channels_last", 1, 12, 6, 5, torch.bfloat16)
    out = image_attention(q, k, v, heads=2)
    assert out.dtype == torch.bfloat16
    expect = image_attention_ref(q, k, v, heads=2, upcast=True)
    assert_close_rel(out, expect, torch.bfloat16, "bf16 output")
    grad = torch.randn_like(out)
    (g,) = _grads(out, (qkv,), grad)
    (w,) = _grads(expect, (qkv,), grad.double())
    assert_close_rel(g, w, torch.bfloat16, "bf16 d(qkv)")


def test_fp32_works_with_every_tf32_setting_api():
    """torch's new fp32_precision API and the legacy allow_tf32 flag must both be readable."""
    q, k, v = (torch.randn(1, 1, 40, 16, device=DEVICE) for _ in range(3))
    expect = flash_attention_ref(q, k, v, upcast=True)
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        for setting in ("tf32", "ieee"):
            matmul.fp32_precision = setting
            assert_close_rel(flash_attention(q, k, v), expect, torch.float32, f"fp32_precision={setting}",
                             tol=FP32_PRECISION_TOL[setting] if ON_GPU else None)
    finally:
        matmul.fp32_precision = saved


def test_only_requested_gradients_are_computed():
    q, k, v = (torch.randn(1, 2, 20, 8, device=DEVICE) for _ in range(3))
    q.requires_grad_()
    out = flash_attention(q, k, v)
    (g,) = torch.autograd.grad(out.sum(), q)
    (w,) = torch.autograd.grad(flash_attention_ref(q, k, v, upcast=True).sum(), q)
    assert_close_rel(g, w, torch.float32, "dq alone")
    v.requires_grad_()
    q.requires_grad_(False)
    (g,) = torch.autograd.grad(flash_attention(q, k, v).sum(), v)
    (w,) = torch.autograd.grad(flash_attention_ref(q, k, v, upcast=True).sum(), v)
    assert_close_rel(g, w, torch.float32, "dv alone")


def test_forward_mode_ad_and_double_backward_raise():
    q = torch.randn(1, 1, 6, 4, device=DEVICE, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=r"forward-mode AD .* is not supported"):
        torch.func.jvp(lambda a: flash_attention(a, q, q), (q,), (torch.ones_like(q),))
    x = q.clone().requires_grad_()
    (g,) = torch.autograd.grad(flash_attention(x, x, x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"image_attention does not support double backward"):
        g.sum().backward()


def test_numpy_integers_and_reals_are_accepted():
    np = pytest.importorskip("numpy")
    q = torch.randn(1, 8, 4, 4, device=DEVICE)
    out = image_attention(q, q, q, heads=np.int64(2), patch_size=np.int32(2), scale=np.float32(0.5))
    assert torch.equal(out, image_attention(q, q, q, heads=2, patch_size=2, scale=0.5))


@contextlib.contextmanager
def _torch_fp32_precision(setting):
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = setting
    try:
        yield
    finally:
        matmul.fp32_precision = saved


def test_fp32_precision_a_call_gets():
    """3×TF32 under PyTorch's default, tf32 where PyTorch allows it, an explicit precision wins;
    other dtypes take no fp32 precision."""
    assert dot_precision(torch.float32) == "tf32x3"
    with _torch_fp32_precision("tf32"):
        assert dot_precision(torch.float32) == "tf32"
        assert dot_precision(torch.float32, "ieee") == "ieee"
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert dot_precision(torch.float32, "tf32x3") == "tf32x3"
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert dot_precision(dtype, "tf32") == "ieee"


def test_fp32_precision_reaches_the_kernels(monkeypatch):
    """The resolved precision is the PRECISION constexpr of every dot-product kernel of the call."""
    import attnsr.kernels.attention as attn

    seen = []
    real = attn._dtypes
    monkeypatch.setattr(attn, "_dtypes", lambda dtype, precision=None: seen.append(
        real(dtype, precision)["PRECISION"]) or real(dtype, precision))
    q = torch.randn(1, 1, 20, 8, device=DEVICE, requires_grad=True)
    for precision, expect in ((None, "tf32x3"), ("ieee", "ieee"), ("tf32", "tf32")):
        seen.clear()
        out = flash_attention(q, q, q, precision=precision)
        out.backward(torch.randn_like(out))
        assert seen == [expect, expect], (precision, seen)
        assert_close_rel(out, flash_attention_ref(q, q, q, upcast=True), torch.float32, f"precision={precision}",
                         tol=FP32_PRECISION_TOL[expect] if ON_GPU else None)
    with pytest.raises(ValueError, match="precision = 'fp32'; expected None"):
        flash_attention(q, q, q, precision="fp32")


@needs_gpu
@pytest.mark.parametrize("precision", [None, "tf32x3", "ieee", "tf32"])
def test_fp32_precision_accuracy_against_float64(precision):
    """3×TF32 (the default) and exact fp32 within 1e-5 of float64, forward and every gradient;
    one tf32 product within 5e-3 (tests/tolerances.py)."""
    tol = FP32_PRECISION_TOL[dot_precision(torch.float32, precision)]
    qkv = torch.randn(2, 3 * 64, 16, 16, device=DEVICE, requires_grad=True)
    q, k, v = qkv.split(64, 1)
    out = image_attention(q, k, v, precision=precision)
    expect = image_attention_ref(q, k, v, upcast=True)
    grad = torch.randn_like(out)
    assert_close_rel(out, expect, torch.float32, f"{precision} output", tol=tol)
    (g,) = _grads(out, (qkv,), grad)
    (w,) = _grads(expect, (qkv,), grad.double())
    assert_close_rel(g, w, torch.float32, f"{precision} d(qkv)", tol=tol)


@needs_gpu
def test_tf32_rounding_shows_when_pytorch_allows_tf32():
    """With allow_tf32 the default call moves by one tf32 product's rounding, well above exact fp32's
    error: the test fails if the flag is ignored."""
    q, k, v = (torch.randn(1, 1, 256, 64, device=DEVICE) for _ in range(3))
    expect = flash_attention_ref(q, k, v, upcast=True)
    exact = rel_error(flash_attention(q, k, v, precision="ieee"), expect)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = rel_error(flash_attention(q, k, v), expect)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert tf32 < FP32_PRECISION_TOL["tf32"], f"tf32 error {tf32:.2e}"
    assert tf32 > 10 * exact and tf32 > 1e-5, f"tf32 error {tf32:.2e} vs fp32 {exact:.2e}: the flag was ignored"


# ----------------------------------------------------------------------------------------------
# Reference helpers, empty inputs, errors
# ----------------------------------------------------------------------------------------------


def test_token_helpers_round_trip():
    x = torch.randn(2, 12, 6, 9)
    t = image_to_tokens(x, heads=3, patch_size=3)
    assert t.shape == (2, 3, 6, 36)
    # token 1 of head 0 is the patch at rows 0..2, cols 3..5, channels 0..3
    assert torch.equal(t[0, 0, 1], x[0, 0:4, 0:3, 3:6].reshape(-1))
    assert torch.equal(tokens_to_image(t, 12, 6, 9, 3), x)


def test_empty_batch_returns_empty_and_backpropagates():
    qkv = torch.randn(0, 3 * 8, 4, 4, device=DEVICE, requires_grad=True)
    out = image_attention(*qkv.split(8, dim=1), heads=2)
    assert out.shape == (0, 8, 4, 4)
    (g,) = torch.autograd.grad(out.sum(), qkv)
    assert g.shape == qkv.shape
    q = torch.randn(0, 2, 5, 8, device=DEVICE)
    assert flash_attention(q, q, q).shape == (0, 2, 5, 8)


def _bad(**kw):
    base = dict(
        q=torch.randn(2, 8, 4, 4, device=DEVICE),
        k=torch.randn(2, 8, 4, 4, device=DEVICE),
        v=torch.randn(2, 8, 4, 4, device=DEVICE),
    )
    base.update(kw)
    return base


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        (_bad(q=torch.randn(2, 8, 16, device=DEVICE)), {}, ValueError, r"q has 3 dims.*expected 4 dims"),
        (
            _bad(k=torch.randn(2, 8, 2, 2, device=DEVICE)),
            {},
            ValueError,
            r"q is \(2, 8, 4, 4\) but k is \(2, 8, 2, 2\)",
        ),
        (
            _bad(v=torch.randn(2, 8, 4, 4, device=DEVICE, dtype=torch.float64)),
            {},
            TypeError,
            r"q is torch.float32 but v is torch.float64",
        ),
        (_bad(k=torch.randn(2, 8, 4, 4, device="meta")), {}, ValueError, r"all inputs must be on one device"),
        (_bad(q=torch.ones(2, 8, 4, 4, device=DEVICE, dtype=torch.int64)), {}, TypeError, r"q has dtype torch.int64"),
        (_bad(), {"heads": 3}, ValueError, r"heads = 3 does not divide C = 8"),
        (_bad(), {"patch_size": 3}, ValueError, r"patch_size = 3 does not divide the map size H×W = 4×4"),
        (_bad(), {"heads": 0}, ValueError, r"heads must be a positive int, got 0"),
        (_bad(), {"heads": 1.5}, TypeError, r"heads must be a positive int, got 1.5"),
        (_bad(), {"scale": float("nan")}, ValueError, r"scale must be a finite real number"),
        (_bad(), {"scale": "0.5"}, TypeError, r"scale must be a finite real number"),
        (
            {k: torch.randn(1, 80, 4, 4, device=DEVICE) for k in "qkv"},
            {"patch_size": 2},
            ValueError,
            r"head dim D = .* = 320 is above the kernel's limit 256",
        ),
        ({"q": "not a tensor", "k": None, "v": None}, {}, TypeError, r"q must be a torch.Tensor, got str"),
        (
            _bad(q=torch.randn(2, 8, 4, 4, device=DEVICE).to_sparse()),
            {},
            TypeError,
            r"q has layout torch.sparse_coo; expected a dense",
        ),
    ],
)
def test_image_attention_rejects_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        image_attention(args["q"], args["k"], args["v"], **kwargs)


def test_token_counts_past_int32_are_refused():
    """Token indices are int32 in the kernels: 2^31 tokens (stride-0 views, nothing allocated) get an
    error, not wrapped indices."""
    side = 46341  # 46341² > 2^31
    m = torch.zeros((), device=DEVICE).expand(1, 1, side, side)
    with pytest.raises(ValueError, match=r"image_attention: 2147488281 tokens per sequence; the kernels handle"):
        image_attention(m, m, m)
    s = torch.zeros((), device=DEVICE).expand(1, 1, 2**31, 4)
    short = torch.zeros(1, 1, 8, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"flash_attention: 2147483648 tokens per sequence"):
        flash_attention(short, s, s)


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape, match",
    [
        ((2, 8, 4), (2, 8, 4), (2, 8, 4), r"q has 3 dims"),
        ((1, 2, 5, 8), (1, 2, 6, 8), (1, 2, 7, 8), r"k is \(1, 2, 6, 8\) but v is \(1, 2, 7, 8\)"),
        ((1, 2, 5, 8), (1, 3, 6, 8), (1, 3, 6, 8), r"same B, H and D"),
        ((1, 2, 5, 16), (1, 2, 6, 8), (1, 2, 6, 8), r"same B, H and D"),
        ((1, 1, 5, 300), (1, 1, 6, 300), (1, 1, 6, 300), r"above the kernel's limit 256"),
        ((1, 1, 5, 8), (1, 1, 0, 8), (1, 1, 0, 8), r"M = 0 keys"),
    ],
)
def test_flash_attention_rejects_bad_input(q_shape, k_shape, v_shape, match):
    q, k, v = (torch.randn(s, device=DEVICE) for s in (q_shape, k_shape, v_shape))
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v)


@pytest.mark.skipif(ON_GPU, reason="checks the CPU path without the interpreter")
def test_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 8, 4, 4)
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1.*backend='torch'"):
        image_attention(q, q, q)


# ----------------------------------------------------------------------------------------------
# torch.library integration: opcheck, autocast, torch.compile
# ----------------------------------------------------------------------------------------------


def test_custom_ops_pass_opcheck():
    from attnsr.kernels.attention import _attention_backward_op, _attention_op

    qkv = torch.randn(2, 3 * 8, 4, 6, device=DEVICE, requires_grad=True)
    q, k, v = qkv.split(8, dim=1)
    q_cl = q.contiguous(memory_format=torch.channels_last)
    for args in ((q, k, v, "map", 2, 2, 0.5, "tf32x3"), (q_cl, k, v, "map", 1, 1, 0.3, "ieee")):
        result = torch.library.opcheck(_attention_op, args)
        assert all(r == "SUCCESS" for r in result.values()), result
    seq = [torch.randn(1, 2, n, 8, device=DEVICE, requires_grad=True) for n in (5, 7, 7)]
    result = torch.library.opcheck(_attention_op, (*seq, "seq", 2, 1, 0.3, "tf32"))
    assert all(r == "SUCCESS" for r in result.values()), result
    seq = [t.detach() for t in seq]  # the backward op itself has no derivative (no double backward)
    out, lse = _attention_op(*seq, "seq", 2, 1, 0.3, "tf32x3")
    do = torch.randn_like(out)
    for need_dq, need_dkdv in ((True, True), (False, True), (True, False)):
        args = (do, *seq, out, lse, "seq", 2, 1, 0.3, "tf32x3", need_dq, need_dkdv)
        result = torch.library.opcheck(_attention_backward_op, args)
        assert all(r == "SUCCESS" for r in result.values()), result


def test_lse_output_is_not_differentiable():
    """The op's second output, the log-sum-exp saved for backward, is a statistic: no gradient
    flows through it, and asking for one says so instead of returning garbage."""
    qkv = torch.randn(1, 3 * 8, 4, 6, device=DEVICE, requires_grad=True)
    out, lse = torch.ops.attnsr.attention(*qkv.split(8, dim=1), "map", 2, 1, 0.5, "tf32x3")
    assert out.requires_grad
    assert not lse.requires_grad and lse.grad_fn is None, "lse must be marked non-differentiable"
    with pytest.raises(RuntimeError, match=r"does not require grad"):
        torch.autograd.grad(lse.sum(), qkv)


def test_autocast_runs_the_kernel_in_half_precision():
    dtype = torch.float16
    qkv = torch.randn(1, 3 * 16, 6, 6, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE.type, dtype=dtype):
        out = image_attention(*qkv.split(16, dim=1), heads=2)
    assert out.dtype == dtype
    expect = image_attention_ref(*qkv.split(16, dim=1), heads=2, upcast=True)
    assert_close_rel(out, expect, dtype, "autocast output")
    (g,) = torch.autograd.grad(out.float().sum(), qkv)
    assert g.dtype == torch.float32
    (w,) = torch.autograd.grad(expect.sum(), qkv)
    assert_close_rel(g, w, dtype, "autocast d(qkv)")


@needs_gpu
def test_torch_compile_fullgraph():
    def f(qkv):
        return image_attention(*qkv.split(16, dim=1), heads=2, patch_size=2).square().sum()

    qkv = torch.randn(2, 3 * 16, 8, 12, device=DEVICE, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True)
    (g,) = torch.autograd.grad(compiled(qkv), qkv)
    (w,) = torch.autograd.grad(f(qkv), qkv)
    assert torch.equal(g, w) or rel_error(g, w) < REL_TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_kernels_launch_on_the_tensors_device():
    """Triton launches on the current device; the ops must switch to their inputs' device."""
    from attnsr import kernels

    dev = torch.device("cuda:1")
    qkv = torch.randn(1, 3 * 8, 6, 6, device=dev, requires_grad=True)
    with torch.cuda.device(0):
        out = image_attention(*qkv.split(8, dim=1))
        gated = kernels.cbam_gate(out, *(torch.randn(s, device=dev) for s in ((2, 8), (2,), (8, 2), (8,))),
                                  torch.randn(1, 2, 3, 3, device=dev), None, pool="avgmax")
        (g,) = torch.autograd.grad(gated.sum(), qkv)
    expect = image_attention_ref(*qkv.split(8, dim=1), upcast=True)
    assert_close_rel(out, expect, torch.float32, "output on cuda:1")
    assert g.device == dev and torch.isfinite(g).all()


def test_float64_keeps_float64_accuracy():
    """Every scalar of a float64 kernel is float64 (on a GPU by the signature's fp64 type, in the
    interpreter by never passing the scale through a helper that would narrow it to fp32): the
    output is within float64 rounding of the reference, not fp32's (an fp32 scale gives ~1e-8)."""
    qkv = torch.randn(2, 3 * 8, 6, 7, device=DEVICE, dtype=torch.float64)
    q, k, v = qkv.split(8, 1)
    for scale in (None, 0.3):
        assert_close_rel(image_attention(q, k, v, scale=scale), image_attention_ref(q, k, v, scale=scale),
                         torch.float64, f"float64 output, scale {scale}", tol=1e-13)
