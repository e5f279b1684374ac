"""Networks suite: one training step (forward, L1 loss, backward, AdamW step) of the documents'
networks, AttentionSRNet (×2) and ImageInpaintingModel (4-channel input), with each backend.

Providers are the layers' backends: ``naive`` (the documents' code: bmm + softmax attention,
gates with pooling modules and 1×1 convolutions), ``torch`` (SDPA, functional eager gating) and
``triton`` (fused kernels, GPU only). What the backends change: in ImageInpaintingModel its
self-attention layers; in AttentionSRNet only the channel attention (its spatial attention
is the document's conv mode, the same PyTorch code on every backend). FLOPs count the self-attention
only (4·B·N²·D forward, 3.5× with backward: the backward is 2.5× the forward), so AttentionSRNet rows
have none.
"""

import torch

from benchmarks.harness import FWD_BWD_FLOPS, Bench, Skip, gib, memory_budget

SIZES = (64, 128, 256)
CPU_MAX_ATTENTION_FLOPS = 1e12


def _batch(size: int, device: torch.device) -> int:
    return 1 if device.type == "cpu" else max(1, 65536 // (size * size))


def cases(device: torch.device, quick: bool = False) -> list:
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    out = []
    for net in ("AttentionSRNet", "ImageInpaintingModel"):
        runs = [(size, _batch(size, device)) for size in (SIZES[:2] if quick else SIZES)]
        if net == "ImageInpaintingModel" and device.type == "cuda" and not quick:
            runs.append((256, 8))  # the training-step target: batch 8 at 256²
        for size, b in runs:
            shape = f"{b}x{4 if net == 'ImageInpaintingModel' else 3}x{size}x{size}"
            if b != _batch(size, device):
                shape += f" b{b}"  # kept off the others' plot series (they hold ~64K pixels per step)
            for provider in ("naive", "torch", "triton"):
                out.append({"suite": "networks", "op": net, "provider": provider, "mode": "train step",
                            "dtype": dtype, "shape": shape, "group": f"{net} train step {dtype} {shape}",
                            "batch": b, "size": size})
    return out


def headline(case: dict) -> bool:
    """Behind the targets: the inpainting network's training step at 256²."""
    return case["op"] == "ImageInpaintingModel" and case["size"] == 256


def _attention_layers(case: dict):
    """(tokens N, head dim D) of every self-attention of the network at this input size."""
    if case["op"] != "ImageInpaintingModel":
        return []
    s = case["size"]
    return [(s * s, 64), ((s // 2) ** 2, 128), ((s // 4) ** 2, 256), ((s // 2) ** 2, 128), (s * s, 64)]


def flops(case: dict) -> float:
    return sum(4.0 * case["batch"] * n * n * d * FWD_BWD_FLOPS for n, d in _attention_layers(case))


def naive_bytes(case: dict) -> float:
    elt = torch.finfo(getattr(torch, case["dtype"])).bits // 8
    return sum(case["batch"] * n * n * elt * 3 for n, _ in _attention_layers(case))  # saved for backward


def build(case: dict, device: torch.device) -> Bench:
    from attnsr.models import AttentionSRNet, ImageInpaintingModel

    if case["provider"] == "triton" and device.type != "cuda":
        raise Skip("Triton kernels need a GPU (on CPU they run in Triton's interpreter, a test tool)")
    if device.type == "cpu" and flops(case) > CPU_MAX_ATTENTION_FLOPS:
        raise Skip(f"{flops(case) / 1e12:.1f} TFLOP of attention per step: too slow for a CPU run")
    if case["provider"] == "naive" and naive_bytes(case) > memory_budget(device):
        raise Skip(f"would need ~{gib(naive_bytes(case))} for the N×N matrices; does not fit")
    dtype = getattr(torch, case["dtype"])
    b, s = case["batch"], case["size"]
    gen = torch.Generator(device).manual_seed(0)
    if case["op"] == "AttentionSRNet":
        model = AttentionSRNet(scale=2, backend=case["provider"])
        x = torch.rand(b, 3, s, s, device=device, generator=gen)
        target = torch.rand(b, 3, 2 * s, 2 * s, device=device, generator=gen)
    else:
        model = ImageInpaintingModel(in_channels=4, backend=case["provider"])
        x = torch.rand(b, 4, s, s, device=device, generator=gen)
        target = torch.rand(b, 3, s, s, device=device, generator=gen) * 2 - 1
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = device.type == "cuda" and dtype != torch.float32

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = torch.nn.functional.l1_loss(model(x).float(), target)
        loss.backward()
        optimizer.step()

    return Bench(step, flops=flops(case))
