"""Gating suite: channel, spatial, CBAM gates and layer fusion; fused vs eager vs torch.compile.

Providers:
- ``eager``: the reference maths of attnsr.kernels.reference in the input dtype (what a model written
  with PyTorch ops runs);
- ``compile``: ``torch.compile`` of that same function;
- ``fused``: attnsr's Triton kernels (GPU only).

Bytes are the counted minimum for the op: forward reads x once and writes y once (layer fusion:
reads L maps, writes one); forward + backward adds reading dy and x and writing dx (layer fusion:
dy, the L maps, L gradients). GB/s = those bytes / median time.
"""

import torch

from benchmarks.harness import Bench, Skip

SHAPES = ((16, 64, 64, 64), (8, 64, 128, 128), (4, 128, 256, 256))  # map sizes 64², 128², 256²
OPS = ("channel_gate", "spatial_gate", "cbam_gate", "layer_fusion")
LAYERS = 3  # maps fused by layer_fusion
REDUCTION = 16


def cases(device: torch.device, quick: bool = False) -> list:
    dtypes = ["float32", "bfloat16"] if device.type == "cuda" else ["float32"]
    shapes = SHAPES[1:2] if quick else SHAPES
    out = []
    for dtype in dtypes[-1:] if quick else dtypes:
        for mode in ("fwd", "fwd+bwd"):
            for shape in shapes:
                for op in OPS:
                    s = "x".join(map(str, shape))
                    for provider in ("eager", "compile", "fused"):
                        out.append({"suite": "gating", "op": op, "provider": provider, "mode": mode, "dtype": dtype,
                                    "shape": s, "group": f"{op} {mode} {dtype} {s}", "dims": list(shape)})
    return out


def headline(case: dict) -> bool:
    """Behind the targets: the fused CBAM gate in bf16 on the largest map (its compile baseline
    takes tens of seconds to build, so one shape)."""
    return case["op"] == "cbam_gate" and case["dtype"] == "bfloat16" and case["dims"] == list(SHAPES[-1])


def min_bytes(case: dict) -> float:
    b, c, h, w = case["dims"]
    numel = b * c * h * w * torch.finfo(getattr(torch, case["dtype"])).bits // 8
    if case["op"] == "layer_fusion":
        return numel * ((LAYERS + 1) if case["mode"] == "fwd" else (LAYERS + 1) + (1 + 2 * LAYERS))
    return numel * (2 if case["mode"] == "fwd" else 5)


def _inputs(case: dict, device: torch.device, dtype: torch.dtype, grad: bool):
    b, c, h, w = case["dims"]
    gen = torch.Generator(device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype).requires_grad_(grad)

    hidden = max(1, c // REDUCTION)
    mlp = [rand(hidden, c, scale=c**-0.5), rand(hidden), rand(c, hidden, scale=hidden**-0.5), rand(c)]
    if case["op"] == "channel_gate":
        return [rand(b, c, h, w), *mlp], {"pool": "avg"}
    if case["op"] == "spatial_gate":
        return [rand(b, c, h, w), rand(1, 2, 7, 7, scale=0.1), rand(1)], {}
    if case["op"] == "cbam_gate":
        return [rand(b, c, h, w), *mlp, rand(1, 2, 7, 7, scale=0.1), rand(1)], {"pool": "avgmax"}
    maps = [rand(b, c, h, w) for _ in range(LAYERS)]
    return [maps, torch.softmax(rand(b, LAYERS), 1).detach().requires_grad_(grad)], {}


def build(case: dict, device: torch.device) -> Bench:
    from attnsr import kernels
    from attnsr.kernels import reference

    if case["provider"] == "fused" and device.type != "cuda":
        raise Skip("Triton kernels need a GPU (on CPU they run in Triton's interpreter, a test tool)")
    dtype = getattr(torch, case["dtype"])
    backward = case["mode"] == "fwd+bwd"
    args, kwargs = _inputs(case, device, dtype, backward)
    op = case["op"]
    if case["provider"] == "fused":
        fn = getattr(kernels, op)
    else:
        ref = getattr(reference, f"{op}_ref")
        if case["provider"] == "compile":
            # a fresh, static-shape compile per case: dynamo's cache would otherwise carry the
            # previous cases' graphs, recompile with dynamic shapes, and after its recompile limit
            # silently run eager
            torch._dynamo.reset()
            fn = torch.compile(ref, dynamic=False)
        else:
            fn = ref
    b, c, h, w = case["dims"]
    grad = torch.randn(b, c, h, w, device=device, dtype=dtype)
    leaves = [t for a in args for t in (a if isinstance(a, list) else [a])]

    def run():
        if not backward:
            with torch.no_grad():
                fn(*args, **kwargs)
            return
        for t in leaves:
            t.grad = None
        fn(*args, **kwargs).backward(grad)

    return Bench(run, bytes=min_bytes(case))
