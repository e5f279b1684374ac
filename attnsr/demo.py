"""``attnsr demo`` (``make demo``): the main job, in a few minutes on a laptop-class CPU.

1. The parity table of every kernel against its float64 reference on this device.
2. A small benchmark: SelfAttention2d(64) forward+backward on a 64×64 map, fused vs the naive
   attention of the source documents — median time (the backends timed interleaved, round-robin)
   and peak memory, measured in this run.
3. A short training of AttentionSRNet (×2) on the photographs bundled with scikit-image, then the
   held-out photo upscaled and compared with bicubic (PSNR/SSIM on Y, border crop 2), saved as a
   side-by-side PNG: bicubic | attnsr | original.

Exit status 0 when every kernel is within its bound and the network beats bicubic on the held-out photo.
"""

import os
import time
from types import SimpleNamespace

import torch

from attnsr.check import enable_interpreter_if_no_gpu, print_parity

# The training budget: about two and a half minutes on two CPU cores.
DEMO_TRAIN = dict(features=32, blocks=4, patch=24, batch_size=16, lr=1e-3, scale=2, val="chelsea", val_size=512)
DEMO_STEPS = {"cpu": 3000, "cuda": 4000}


def build_layer_case(case: dict, device: torch.device) -> SimpleNamespace:
    """SelfAttention2d(channels) forward + backward on a random (1, C, S, S) map with ``backend=provider``
    (the builder :func:`attnsr.timing.cpu_peak_mib` calls in its subprocess)."""
    import attnsr

    gen = torch.Generator(device=device).manual_seed(0)
    size, channels = case["size"], case["channels"]
    layer = attnsr.SelfAttention2d(channels, backend=case["provider"]).to(device)
    x = torch.randn(1, channels, size, size, device=device, generator=gen, requires_grad=True)

    def run():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()

    return SimpleNamespace(fn=run, setup=None)


def _bench_table(device: torch.device) -> None:
    from attnsr.timing import cpu_peak_mib, cuda_peak_mib, device_info, threads_on_free_cores, time_interleaved

    providers = ("naive", "torch", "triton") if device.type == "cuda" else ("naive", "auto")
    size, channels = 64, 64
    cases = {p: {"provider": p, "size": size, "channels": channels} for p in providers}
    benches = {p: build_layer_case(case, device) for p, case in cases.items()}
    # round-robin: a job starting halfway slows every backend alike, so the ratios hold; on the
    # cores other jobs leave free: threads waiting on a busy core slow one backend more than another
    with threads_on_free_cores(device) as (threads, busy):
        times = time_interleaved({p: bench.fn for p, bench in benches.items()}, device, cpu_repeats=5)
    rows = []
    for provider, case in cases.items():
        bench = benches.pop(provider)
        mib = cuda_peak_mib(bench.fn) if device.type == "cuda" else cpu_peak_mib(case, "attnsr.demo:build_layer_case")
        rows.append((provider, times[provider], mib))
        del bench
    _, naive_ms, naive_mib = rows[0]
    where = device_info(device)["device"]
    print(f"\nSelfAttention2d({channels}) forward+backward on a {size}×{size} map, fp32, {where}")
    header = f"{'backend':<8} {'median ms':>10} {'peak MiB':>9} {'time ÷ naive':>13} {'memory ÷ naive':>15}"
    print(header)
    print("-" * len(header))
    for provider, ms, mib in rows:
        print(f"{provider:<8} {ms:10.1f} {mib:9.1f} {ms / naive_ms:12.2f}× {mib / naive_mib:14.3f}×")
    if device.type == "cpu":
        print("(on CPU `auto` is PyTorch SDPA; the Triton kernels run on CPU only in the interpreter, a test tool)")
        if threads < torch.get_num_threads():
            print(f"(timed with {threads} of PyTorch's {torch.get_num_threads()} CPU threads: other processes kept "
                  f"{busy:.1f} cores busy)")


def _side_by_side(panels, captions, path) -> None:
    """Write panels (3, H, W) in [0, 1] side by side with a caption strip under each."""
    from PIL import Image, ImageDraw

    from attnsr.images import atomic_write, to_uint8

    gap, strip = 6, 22
    h = max(p.shape[-2] for p in panels)
    w = sum(p.shape[-1] for p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (w, h + strip), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for panel, caption in zip(panels, captions):
        canvas.paste(Image.fromarray(to_uint8(panel)), (x, 0))
        draw.text((x + 4, h + 5), caption, fill="black")
        x += panel.shape[-1] + gap
    with atomic_write(path) as tmp:
        canvas.save(tmp, format="PNG")


def _train_and_compare(out: str, steps: int, device: torch.device) -> bool:
    from attnsr import data, infer
    from attnsr.checkpoint import load_checkpoint, model_from_checkpoint
    from attnsr.metrics import psnr, ssim
    from attnsr.train import TrainConfig, train

    cfg = TrainConfig(task="sr", out=os.path.join(out, "sr"), steps=steps, val_every=max(1, steps // 4),
                      ckpt_every=steps, device=str(device), **DEMO_TRAIN)
    print(f"\nTraining AttentionSRNet ×{cfg.scale} ({cfg.features} features, {cfg.blocks} blocks) for {steps} steps "
          f"on the scikit-image photos, holding out '{cfg.val}'")
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start

    model = model_from_checkpoint(load_checkpoint(result["checkpoint"], task="sr"))
    photos = data.load_photos(cfg.data)
    _, val = data.split_photos(photos, cfg.val)
    name, lr, hr = data.val_sr_pairs(val, cfg.scale, max_size=cfg.val_size)[0]
    sr = infer.upscale(model, lr[0], scale=cfg.scale, device=device)[None]
    bicubic = data.bicubic_up(lr, cfg.scale)
    scores = {k: (psnr(img, hr, crop=cfg.scale).item(), ssim(img, hr, crop=cfg.scale).item())
              for k, img in (("bicubic", bicubic), ("attnsr", sr))}
    png = os.path.join(out, "sr-demo.png")
    _side_by_side([bicubic[0], sr[0], hr[0]],
                  [f"bicubic x{cfg.scale}: {scores['bicubic'][0]:.2f} dB", f"attnsr: {scores['attnsr'][0]:.2f} dB",
                   "original"], png)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nHeld-out photo '{name}' ({hr.shape[-1]}×{hr.shape[-2]}), ×{cfg.scale}, Y channel, "
          f"border crop {cfg.scale}; trained {seconds:.0f} s on {where} (backend auto)")
    print(f"{'method':<10} {'PSNR dB':>8} {'SSIM':>7}")
    for k, (p, s) in scores.items():
        print(f"{k:<10} {p:8.2f} {s:7.4f}")
    gain = scores["attnsr"][0] - scores["bicubic"][0]
    print(f"attnsr is {gain:+.2f} dB against bicubic")
    print(f"side by side (bicubic | attnsr | original): {os.path.abspath(png)}")
    print(f"checkpoint: {os.path.abspath(result['checkpoint'])}")
    return gain > 0


def run_demo(out: str = "demo-output", steps: int | None = None, device=None) -> int:
    enable_interpreter_if_no_gpu()
    started = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(out, exist_ok=True)
    failures = print_parity(device)
    _bench_table(device)
    beat = _train_and_compare(out, steps or DEMO_STEPS[device.type], device)
    if failures:
        print(f"demo: {failures} kernel case(s) out of bounds")
    if not beat:
        print("demo: the network did not beat bicubic on the held-out photo")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0 if not failures and beat else 1


if __name__ == "__main__":
    raise SystemExit(run_demo())
