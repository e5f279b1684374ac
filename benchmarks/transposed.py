"""Transposed suite: Restormer's MDTA (transposed, channel self-attention) after its convolutions,
fused vs eager vs torch.compile, forward and forward + backward, time and peak memory.

Providers:
- ``eager``: Restormer's maths as written (``kernels.reference.transposed_attention_ref`` in the input
  dtype: F.normalize of q and k over the pixels, the d×d product, softmax, ·v);
- ``compile``: ``torch.compile`` of that same function (GPU only: on a CPU its build takes minutes);
- ``fused``: ``attnsr.kernels.transposed_attention`` (on a CPU: Triton's interpreter in a subprocess,
  peak memory only).

q, k, v are split views of one (B, 3C, H, W) tensor, as Restormer's depthwise qkv convolution
produces them; the temperature is (heads, 1, 1). Shapes: Restormer's levels (C, heads) = (48, 1),
(96, 2), (192, 4), (384, 8) — head dim 48 throughout — on the map sizes those levels see for a
256² and a 128² input. Bytes: the op's minimum, reading q, k, v and writing out (forward), plus
reading dO and q, k, v again and writing their gradients (forward + backward).
"""

import torch

from benchmarks.harness import Skip

# (batch, channels, heads, map side): Restormer's four levels for a 256² crop (its training size),
# and the first two for a 128² one
SHAPES = ((1, 48, 1, 256), (1, 96, 2, 128), (1, 192, 4, 64), (1, 384, 8, 32), (4, 48, 1, 128), (4, 96, 2, 64))
CPU_SHAPES = ((1, 48, 1, 64), (1, 96, 2, 32))  # small enough for the interpreter's memory-only rows


def cases(device: torch.device, quick: bool = False) -> list:
    gpu = device.type == "cuda"
    dtypes = ["float32", "bfloat16"] if gpu else ["float32"]
    shapes = SHAPES if gpu else CPU_SHAPES
    if quick:
        shapes, dtypes = shapes[:1], dtypes[-1:]
    out = []
    for dtype in dtypes:
        for mode in ("fwd", "fwd+bwd"):
            for b, c, heads, side in shapes:
                shape = f"{b}x{c}x{side}x{side} h{heads}"
                for provider in ("eager", "compile", "fused"):
                    case = {"suite": "transposed", "op": "transposed_attention", "provider": provider, "mode": mode,
                            "dtype": dtype, "shape": shape, "group": f"transposed_attention {mode} {dtype} {shape}",
                            "dims": [b, c, side, side], "heads": heads}
                    if provider == "fused" and not gpu:
                        case["interpret"] = True  # memory only, in a subprocess
                    out.append(case)
    return out


def headline(case: dict) -> bool:
    """Behind the target (≥ 2× eager fwd+bwd at ≤ 0.5× its peak memory): Restormer's first level, bf16."""
    return case["dtype"] == "bfloat16" and case["dims"] == [1, 48, 256, 256] and case["mode"] == "fwd+bwd"


def min_bytes(case: dict) -> float:
    b, c, h, w = case["dims"]
    numel = b * c * h * w * torch.finfo(getattr(torch, case["dtype"])).bits // 8
    return numel * (4 if case["mode"] == "fwd" else 4 + 7)


def build(case: dict, device: torch.device):
    from attnsr import kernels
    from attnsr.kernels import reference
    from benchmarks.harness import Bench

    if case["provider"] == "compile" and device.type != "cuda":
        raise Skip("torch.compile's build takes minutes on a CPU; GPU only")
    dtype = getattr(torch, case["dtype"])
    backward = case["mode"] == "fwd+bwd"
    b, c, h, w = case["dims"]
    heads = case["heads"]
    gen = torch.Generator(device).manual_seed(0)
    qkv = torch.randn(b, 3 * c, h, w, device=device, generator=gen).to(dtype).requires_grad_(backward)
    temperature = (torch.rand(heads, 1, 1, device=device, generator=gen) + 0.5).requires_grad_(backward)
    grad = torch.randn(b, c, h, w, device=device, generator=gen).to(dtype)
    if case["provider"] == "fused":
        fn = kernels.transposed_attention
    else:
        fn = reference.transposed_attention_ref
        if case["provider"] == "compile":
            torch._dynamo.reset()  # a fresh static-shape compile per case (see the gating suite)
            fn = torch.compile(fn, dynamic=False)

    def run():
        q, k, v = qkv.chunk(3, dim=1)
        if not backward:
            with torch.no_grad():
                fn(q, k, v, temperature, heads=heads)
            return
        qkv.grad = temperature.grad = None
        fn(q, k, v, temperature, heads=heads).backward(grad)

    return Bench(run, bytes=min_bytes(case))
