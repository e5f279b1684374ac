"""Gating suite: channel, spatial, CBAM gates and layer fusion; fused vs eager vs torch.compile.

Providers:
- ``eager``: the reference maths of attnsr.kernels.reference in the input dtype (what a model written
  with PyTorch ops runs);
- ``compile``: ``torch.compile`` of that same function;
- ``fused``: attnsr's Triton kernels (GPU only).

Bytes are the counted minimum for the op: forward reads x once and writes y once (layer fusion:
reads L maps, writes one); forward + backward adds reading dy and x and writing dx (layer fusion:
dy, the L maps, L gradients). GB/s = those bytes / median time. On a GPU each row also counts
the GPU kernels one call runs (``kernels``: torch.profiler), beside eager's and compile's.

``rcan_group`` (full GPU runs only): one training step (forward, L1 loss, backward, AdamW) of a
residual group of RCAN, 10 residual channel-attention blocks of 64 features (3×3 conv, ReLU, 3×3
conv, channel attention with reduction 16, skip) and the group's closing conv and skip, on
16×64×64² under bf16 autocast (fp32 on a CPU). ``eager``: the channel attention as RCAN writes it
(``attnsr.ChannelAttention`` with backend "naive": pooling module, 1×1 convs, sigmoid);
``compile``: torch.compile of that group; ``fused``: backend "triton" (GPU only).
"""

import torch
from torch import nn

from benchmarks.harness import Bench, Skip

SHAPES = ((16, 64, 64, 64), (8, 64, 128, 128), (4, 128, 256, 256))  # map sizes 64², 128², 256²
OPS = ("channel_gate", "spatial_gate", "cbam_gate", "layer_fusion")
LAYERS = 3  # maps fused by layer_fusion
REDUCTION = 16
RCAN_GROUP = dict(blocks=10, channels=64, batch=16, size=64)  # RCAN's residual group, its training map
COUNT_KERNELS = True  # the harness counts each row's GPU kernels per call


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
    if not quick and device.type == "cuda":  # on 2 CPU cores a step takes tens of seconds
        g = RCAN_GROUP
        dims = [g["batch"], g["channels"], g["size"], g["size"]]
        s = "x".join(map(str, dims))
        dtype = dtypes[-1]
        for provider in ("eager", "compile", "fused"):
            out.append({"suite": "gating", "op": "rcan_group", "provider": provider, "mode": "train step",
                        "dtype": dtype, "shape": s, "group": f"rcan_group train step {dtype} {s}", "dims": dims})
    return out


def headline(case: dict) -> bool:
    """Behind the targets: the fused CBAM gate in bf16 on the largest map (its compile baseline
    takes tens of seconds to build, so one shape), RCAN's channel attention forward+backward in
    bf16 on its 16×64×64² map, and the RCAN residual group's training step."""
    if case["op"] == "rcan_group":
        return True
    if case["op"] == "channel_gate":
        return case["dtype"] == "bfloat16" and case["mode"] == "fwd+bwd" and case["dims"] == list(SHAPES[0])
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


class _RCAB(nn.Module):
    """RCAN's residual channel-attention block: x + CA(conv(relu(conv(x))))."""

    def __init__(self, channels: int, backend: str):
        from attnsr import ChannelAttention

        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels, channels, 3, padding=1),
                                  ChannelAttention(channels, REDUCTION, backend=backend))

    def forward(self, x):
        return x + self.body(x)


class _ResidualGroup(nn.Module):
    """RCAN's residual group: x + conv(RCAB(... RCAB(x)))."""

    def __init__(self, blocks: int, channels: int, backend: str):
        super().__init__()
        self.body = nn.Sequential(*(_RCAB(channels, backend) for _ in range(blocks)),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


def _rcan_group_step(case: dict, device: torch.device) -> Bench:
    """One training step of the residual group (module docstring)."""
    torch.manual_seed(0)
    b, c, h, w = case["dims"]
    backend = "triton" if case["provider"] == "fused" else "naive"
    group = _ResidualGroup(RCAN_GROUP["blocks"], c, backend).to(device)
    model = group
    if case["provider"] == "compile":
        torch._dynamo.reset()
        model = torch.compile(group, dynamic=False)
    opt = torch.optim.AdamW(group.parameters(), lr=1e-4)
    x = torch.randn(b, c, h, w, device=device)
    target = torch.randn(b, c, h, w, device=device)
    amp = getattr(torch, case["dtype"]) if device.type == "cuda" else None

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = (model(x) - target).abs().mean()
        loss.backward()
        opt.step()

    return Bench(step)


def build(case: dict, device: torch.device) -> Bench:
    from attnsr import kernels
    from attnsr.kernels import reference

    if case["provider"] == "fused" and device.type != "cuda":
        raise Skip("Triton kernels need a GPU (on CPU they run in Triton's interpreter, a test tool)")
    if case["op"] == "rcan_group":
        return _rcan_group_step(case, device)
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
