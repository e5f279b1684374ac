"""Attention suite: image_attention on (B, C, S, S) maps, providers compared on one shape per group.

Providers:
- ``naive``: the inpainting document's maths (bmm + softmax materialising the N×N scores);
- ``sdpa``: PyTorch's scaled_dot_product_attention, including the permutes/copies NCHW maps need;
- ``attnsr``: the fused Triton kernel reading q, k, v in place (GPU only: on CPU Triton runs in
  its interpreter, a test tool);
and one layer-level group: SelfAttention2d(64) with backend ``naive`` vs ``auto``.

q, k, v are split views of one (B, 3C, S, S) tensor, as a fused QKV convolution produces them.
Dtypes: float32 (PyTorch's default exact fp32), on a GPU also "tf32" (float32 tensors with
``torch.backends.cuda.matmul.allow_tf32`` on for the call) and bfloat16.
FLOPs: 4·B·heads·N·M·D forward, 3.5× that for forward + backward (the backward counted as 2.5× the
forward, as FlashAttention and the Triton tutorial count: TFLOP/s compare with theirs).
"""

import torch

from benchmarks.harness import FWD_BWD_FLOPS, Skip, gib, memory_budget

SIZES = (32, 64, 128, 256)
CPU_MAX_FLOPS = 4e11  # a case above this takes minutes per call on a 2-core CPU: not run there
ATTENTION_BASELINES = ("naive", "sdpa")


def _batch(size: int, patch: int) -> int:
    """About 16K query rows per call whatever the map size."""
    return max(1, 16384 // (size * size))


def _dtype(name: str) -> torch.dtype:
    """The tensors' dtype; "tf32" is float32 run with PyTorch's tf32 matmul setting on."""
    return torch.float32 if name == "tf32" else getattr(torch, name)


def _with_tf32(fn):
    """``fn`` run with ``torch.backends.cuda.matmul.allow_tf32`` on (the naive bmm and the fused
    kernel then use tf32 tensor cores; SDPA's fp32 kernels do as they do), restored after."""

    def run():
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            fn()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before

    return run


def _case(size, channels, heads, patch, dtype, mode, provider):
    b = _batch(size, patch)
    shape = f"{b}x{channels}x{size}x{size} h{heads} p{patch}"
    return {
        "suite": "attention", "op": "image_attention", "provider": provider, "mode": mode, "dtype": dtype,
        "shape": shape, "group": f"image_attention {mode} {dtype} {shape}",
        "batch": b, "size": size, "channels": channels, "heads": heads, "patch": patch,
    }


def cases(device: torch.device, quick: bool = False) -> list:
    dtypes = ["float32", "tf32", "bfloat16"] if device.type == "cuda" else ["float32"]
    shapes = [(s, 64, 1, 1) for s in SIZES]
    shapes += [(s, c, c // 64, 1) for s in (64, 128) for c in (128, 256)]
    shapes += [(s, 128, 1, 1) for s in (64, 128)]  # head dim 128
    shapes += [(s, 64, 1, 2) for s in (64, 128, 256)]
    if quick:
        shapes = [(64, 64, 1, 1), (128, 64, 1, 1)]
        dtypes = dtypes[-1:]
    out = []
    for dtype in dtypes:
        for mode in ("fwd", "fwd+bwd"):
            for size, channels, heads, patch in shapes:
                for provider in ("naive", "sdpa", "attnsr"):
                    out.append(_case(size, channels, heads, patch, dtype, mode, provider))
    for size in (64, 128) if not quick else (128,):
        for provider in ("naive", "auto"):
            shape = f"1x64x{size}x{size}"
            out.append({
                "suite": "attention", "op": "SelfAttention2d", "provider": provider, "mode": "fwd+bwd",
                "dtype": dtypes[0], "shape": shape, "group": f"SelfAttention2d(64) fwd+bwd {dtypes[0]} {shape}",
                "batch": 1, "size": size, "channels": 64, "heads": 1, "patch": 1,
            })
    return out


def headline(case: dict) -> bool:
    """Behind the targets: bf16 and fp32 (3×TF32 against SDPA's fp32) single-head maps of N ≥ 4096
    pixels (head dim 64 and 128), and the layer."""
    if case["op"] == "SelfAttention2d":
        return True
    return case["dtype"] in ("bfloat16", "float32") and case["heads"] == 1 and case["patch"] == 1 and case["size"] >= 64


def flops(case: dict) -> float:
    n = (case["size"] // case["patch"]) ** 2
    d = case["channels"] // case["heads"] * case["patch"] ** 2
    fwd = 4.0 * case["batch"] * case["heads"] * n * n * d
    return fwd * (FWD_BWD_FLOPS if case["mode"] == "fwd+bwd" else 1.0)


def naive_bytes(case: dict) -> float:
    """Memory of the N×N matrices the naive provider keeps: scores and probabilities (forward),
    plus their gradients and the saved softmax (backward)."""
    n = (case["size"] // case["patch"]) ** 2
    elt = torch.finfo(_dtype(case["dtype"])).bits // 8
    return case["batch"] * case["heads"] * n * n * elt * (2 if case["mode"] == "fwd" else 5)


def build(case: dict, device: torch.device):
    from benchmarks.harness import Bench

    import attnsr
    from attnsr import backends

    dtype = _dtype(case["dtype"])
    provider = case["provider"]
    if device.type == "cpu" and provider in ("attnsr",):
        raise Skip("Triton kernels need a GPU (on CPU they run in Triton's interpreter, a test tool)")
    if device.type == "cpu" and flops(case) > CPU_MAX_FLOPS:
        raise Skip(f"{flops(case) / 1e12:.1f} TFLOP per call: too slow for a CPU run")
    if provider == "naive" and naive_bytes(case) > memory_budget(device):
        raise Skip(f"would need ~{gib(naive_bytes(case))} for the N×N matrices; does not fit")
    b, c, s = case["batch"], case["channels"], case["size"]
    backward = case["mode"] == "fwd+bwd"
    gen = torch.Generator(device).manual_seed(0)

    if case["op"] == "SelfAttention2d":
        layer = attnsr.SelfAttention2d(c, backend=provider).to(device, dtype)
        x = torch.randn(b, c, s, s, device=device, dtype=dtype, generator=gen, requires_grad=True)

        def run_layer():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).float().square().mean().backward()

        return Bench(run_layer, flops=flops(case))  # the attention's flops (the convs are not counted)

    qkv = torch.randn(b, 3 * c, s, s, device=device, dtype=dtype, generator=gen).requires_grad_(backward)
    grad = torch.randn(b, c, s, s, device=device, dtype=dtype, generator=gen)
    backend = {"naive": "naive", "sdpa": "torch", "attnsr": "triton"}[provider]
    heads, patch = case["heads"], case["patch"]

    def run():
        q, k, v = qkv.split(c, dim=1)
        out = backends.image_attention(q, k, v, heads=heads, patch_size=patch, backend=backend)
        if backward:
            qkv.grad = None
            out.backward(grad)

    if not backward:
        def run_no_grad():
            with torch.no_grad():
                run()

        fn = run_no_grad
    else:
        fn = run
    return Bench(_with_tf32(fn) if case["dtype"] == "tf32" else fn, flops=flops(case))
