"""Models suite: one training step of whole networks, the figure a user of the layers cares about.

A step is what a training loop runs: forward, L1 loss against a random target, backward, Adam
step (gradients set to None first). Networks: the documents' ``AttentionSRNet`` (×2) and
``ImageInpaintingModel`` (image + mask: 4 channels in), and SwinIR, HAT and RCAN as spandrel builds
them (×2; spandrel is the ``models`` extra, ``pip install spandrel``; without it their cases are
skipped and say so). Networks are in train mode, stochastic depth as published (0.1 for SwinIR
and HAT).

Providers:
- ``eager``: the stock network (attnsr's own with ``backend="naive"``, the documents' code;
  spandrel's as published);
- ``compile``: ``torch.compile`` of that network (static shapes, a fresh compile per case; the
  loss, backward graph and optimizer step around it as eager code runs them);
- ``auto``, ``triton``: that network after ``attnsr.swap_attention(model, backend=...)`` (HAT's
  overlapping cross-attention, OCAB, is not fused and stays as published; each row's note lists
  what was swapped and what was left). On a CPU ``auto`` is PyTorch SDPA / eager gating, and
  ``triton`` runs in Triton's interpreter in a subprocess: its peak memory only, no time (the
  harness's ``interpret`` cases).

Configurations:
- GPU (``paper``): the published networks at the batch and LR patch size their papers train with,
  all on one device: SwinIR classical ×2 (embed 180, 6 RSTB × 6 blocks, 6 heads, window 8) on 48²
  patches, batch 32; HAT ×2 (embed 180, 6 × 6 blocks, window 16, compress 3, squeeze 30, overlap
  0.5) on 64² patches, batch 32; RCAN ×2 (10 groups × 20 blocks, 64 features, reduction 16) on
  48², batch 16. The papers split SwinIR's and HAT's batch of 32 over 8 GPUs; an H200 holds the
  whole batch: the fp32 eager step's peak, measured on CPU at batch 1 (peak RSS growth:
  SwinIR 0.8 GiB, HAT 2.9 GiB, RCAN 0.3 GiB per sample), scales to about 25, 93 and 5 GiB of its
  139 GiB. AttentionSRNet (64 features, 16 blocks; its document gives no recipe) trains as RCAN
  does, 48², batch 16. ImageInpaintingModel at 128², batch 8: its stock attention keeps about
  55 GB of N×N matrices for backward in fp32 (``networks.naive_bytes``; at 256² it would be 880 GB,
  so the stock network has no row there). fp32 as the papers train, and bf16 autocast.
- CPU (``small``): the same blocks, shallower and narrower, on small patches, batch 1, so that the
  interpreted ``triton`` step takes seconds (each up to about 35 s on 2 cores; the whole suite
  took 9 min 48 s with other jobs on the machine, mostly compiling and interpreting):
  AttentionSRNet as published on 32²; ImageInpaintingModel as published on 32²; SwinIR with
  SwinIR-light's head dim 10 (embed 20, 2 heads) and window 8, one RSTB of 2 blocks, on 16²; HAT at
  its window 16 (embed 12, 2 heads, compress 3, squeeze 3), one group of 2 blocks, on 16²; RCAN
  with its 64 features and reduction 16, one group of 2 blocks, on 16². On CPU the rows are for
  memory; their times are a CPU's.

No FLOPs are counted: the rows compare time and memory of whole steps.
"""

import importlib.util

import torch
from torch import nn

from benchmarks.harness import Bench, Skip, gib, memory_budget

MODELS = ("AttentionSRNet", "ImageInpaintingModel", "SwinIR", "HAT", "RCAN")
PUBLISHED = ("SwinIR", "HAT", "RCAN")  # built by spandrel
PROVIDERS = ("eager", "compile", "auto", "triton")
QUICK = ("AttentionSRNet", "SwinIR")
NO_SPANDREL = "needs spandrel: pip install spandrel (the models extra)"

# name -> config -> (constructor keyword arguments, LR patch side, batch); see the module docstring
CONFIGS = {
    "AttentionSRNet": {
        "paper": (dict(num_features=64, num_blocks=16, scale=2), 48, 16),
        "small": (dict(num_features=64, num_blocks=16, scale=2), 32, 1),
    },
    "ImageInpaintingModel": {
        "paper": (dict(in_channels=4), 128, 8),
        "small": (dict(in_channels=4), 32, 1),
    },
    "SwinIR": {
        "paper": (dict(img_size=48, embed_dim=180, depths=[6] * 6, num_heads=[6] * 6, window_size=8, mlp_ratio=2.0,
                       upscale=2, upsampler="pixelshuffle", resi_connection="1conv"), 48, 32),
        "small": (dict(img_size=16, embed_dim=20, depths=[2], num_heads=[2], window_size=8, mlp_ratio=2.0,
                       upscale=2, upsampler="pixelshuffle", resi_connection="1conv"), 16, 1),
    },
    "HAT": {
        "paper": (dict(img_size=64, embed_dim=180, depths=[6] * 6, num_heads=[6] * 6, window_size=16,
                       compress_ratio=3, squeeze_factor=30, conv_scale=0.01, overlap_ratio=0.5, mlp_ratio=2.0,
                       upscale=2, upsampler="pixelshuffle", resi_connection="1conv"), 64, 32),
        # img_size above the window, else HAT drops the shift
        "small": (dict(img_size=32, embed_dim=12, depths=[2], num_heads=[2], window_size=16, compress_ratio=3,
                       squeeze_factor=3, conv_scale=0.01, overlap_ratio=0.5, mlp_ratio=2.0, upscale=2,
                       upsampler="pixelshuffle", resi_connection="1conv"), 16, 1),
    },
    "RCAN": {
        "paper": (dict(scale=2, n_resgroups=10, n_resblocks=20, n_feats=64, reduction=16), 48, 16),
        "small": (dict(scale=2, n_resgroups=1, n_resblocks=2, n_feats=64, reduction=16), 16, 1),
    },
}


def _have_spandrel() -> bool:
    return importlib.util.find_spec("spandrel") is not None


def _channels(name: str) -> int:
    return 4 if name == "ImageInpaintingModel" else 3


def cases(device: torch.device, quick: bool = False) -> list:
    gpu = device.type == "cuda"
    config = "paper" if gpu else "small"
    dtypes = ["float32", "bfloat16"] if gpu else ["float32"]
    if quick:
        dtypes = dtypes[-1:]
    out = []
    for dtype in dtypes:
        for name in QUICK if quick else MODELS:
            _, size, batch = CONFIGS[name][config]
            shape = f"{batch}x{_channels(name)}x{size}x{size} {config}"
            for provider in PROVIDERS:
                case = {"suite": "models", "op": name, "provider": provider, "mode": "train step", "dtype": dtype,
                        "shape": shape, "group": f"{name} train step {dtype} {shape}", "config": config,
                        "batch": batch, "size": size}
                # the interpreted step is measured in a subprocess that builds the network: not
                # without spandrel (the in-process build then skips the case and says why)
                if provider == "triton" and not gpu and (name not in PUBLISHED or _have_spandrel()):
                    case["interpret"] = True
                out.append(case)
    return out


def headline(case: dict) -> bool:
    """Behind the targets: HAT's training step (the network whose block the window suite's headline
    measures)."""
    return case["op"] == "HAT"


def network(name: str, config: str) -> nn.Module:
    """The stock network ``name`` in configuration ``config`` ("paper" or "small"), in train mode."""
    kwargs, _, _ = CONFIGS[name][config]
    if name in PUBLISHED:
        if not _have_spandrel():
            raise Skip(NO_SPANDREL)
        from spandrel.architectures.HAT import HAT
        from spandrel.architectures.RCAN import RCAN
        from spandrel.architectures.SwinIR import SwinIR

        return {"SwinIR": SwinIR, "HAT": HAT, "RCAN": RCAN}[name](**kwargs).train()
    from attnsr import models

    return getattr(models, name)(**kwargs, backend="naive").train()


def _swap_note(name: str, model: nn.Module) -> str:
    """What swap_attention replaced (in attnsr's own networks: switched to the backend) and what it
    left, for the row's note."""
    layers = ", ".join(sorted({new for _, _, new in model.attnsr_swapped}))
    if name not in PUBLISHED:
        return f"backend switched: {layers}"
    left = sorted({f"{old} ({why.split(':')[0]})" for _, old, why in model.attnsr_left})
    return f"swapped to {layers}" + (f"; left as published: {', '.join(left)}" if left else "")


def build(case: dict, device: torch.device) -> Bench:
    import attnsr
    from attnsr.kernels._runtime import interpreting
    from benchmarks.networks import naive_bytes

    name, provider, config = case["op"], case["provider"], case["config"]
    if name in PUBLISHED and not _have_spandrel():
        raise Skip(NO_SPANDREL)
    if device.type == "cpu" and provider == "triton" and not (case.get("interpret") and interpreting()):
        if case.get("interpret"):
            raise Skip("memory only, in Triton's interpreter: measured by benchmarks.report in a subprocess")
        raise Skip("Triton kernels need a GPU (on CPU they run in Triton's interpreter, a test tool)")
    if provider in ("eager", "compile") and naive_bytes(case) > memory_budget(device):
        raise Skip(f"would need ~{gib(naive_bytes(case))} for the N×N matrices; does not fit")
    dtype = getattr(torch, case["dtype"])
    b, s = case["batch"], case["size"]
    torch.manual_seed(0)
    model = network(name, config).to(device)
    note = None
    if provider in ("auto", "triton"):
        attnsr.swap_attention(model, backend=provider)
        if not model.attnsr_swapped:
            raise RuntimeError(f"swap_attention found nothing to swap in {name}: {model.attnsr_left}")
        note = _swap_note(name, model)
    forward = model
    if provider == "compile":
        torch._dynamo.reset()  # a fresh, static-shape compile per case (see gating.py)
        forward = torch.compile(model, dynamic=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.rand(b, _channels(name), s, s, device=device, generator=gen)
    up = 1 if name == "ImageInpaintingModel" else 2
    target = torch.rand(b, 3, up * s, up * s, device=device, generator=gen)
    autocast = device.type == "cuda" and dtype != torch.float32

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = nn.functional.l1_loss(forward(x).float(), target)
        loss.backward()
        optimizer.step()

    return Bench(step, note=note)
