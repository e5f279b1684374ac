"""attnsr.train: the loss falls, checkpoints load with weights_only, resume is exact, two processes agree.

Tiny networks on tiny patches of the bundled photos (chelsea held out, cropped small for validation),
the torch attention backend (the triton one runs under Triton's slow interpreter without a GPU: one
smoke test), CPU unless a test needs the GPU.
"""

import dataclasses
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import needs_gpu
from torch import nn

import attnsr.train as train_module
from attnsr import data, metrics
from attnsr.checkpoint import build_model, load_checkpoint, model_from_checkpoint, save_checkpoint
from attnsr.images import InputError
from attnsr.train import TrainConfig, build_network, fit, train, validate, validation_cases

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SR = dict(task="sr", steps=4, batch_size=2, patch=12, features=8, blocks=1, val_size=24, val_every=100,
               ckpt_every=100, backend="torch", device="cpu", progress=False)


def tiny(tmp_path, name="run", **changes) -> TrainConfig:
    return TrainConfig(out=str(tmp_path / name), **{**TINY_SR, **changes})


def assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} of {len(a)} tensors differ, first {differ[0]}: " \
                       f"max |Δ| {(a[differ[0]] - b[differ[0]]).abs().max().item():.3g}"


def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path):
    cfg = tiny(tmp_path, steps=30, lr=3e-3)
    train_photos, _ = data.split_photos(data.load_photos(), cfg.val)
    batch = data.SRPatches(train_photos, scale=2, patch=12, samples_per_epoch=8, seed=99)
    lr, hr = (torch.stack(t) for t in zip(*(batch[i] for i in range(8))))
    torch.manual_seed(cfg.seed)
    before = nn.functional.l1_loss(build_network(cfg)(lr), hr).item()
    net, result = fit(cfg)
    with torch.no_grad():
        after = nn.functional.l1_loss(net(lr), hr).item()
    assert after < 0.75 * before, f"L1 on a fixed batch went from {before:.4f} to {after:.4f} in 30 steps"
    assert result["step"] == 30 and result["train_loss"] < before


def test_checkpoint_loads_with_weights_only_and_holds_the_documented_keys(tmp_path):
    cfg = tiny(tmp_path, steps=3, val_every=2, ckpt_every=2)
    result = train(cfg)
    last = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    assert last.keys() == {"format", "task", "model", "state_dict", "step", "train", "val"}
    assert last["task"] == "sr" and last["step"] == 3
    assert last["model"] == {"name": "AttentionSRNet",
                             "kwargs": {"num_channels": 3, "num_features": 8, "num_blocks": 1, "scale": 2}}
    state = last["train"]
    assert state.keys() == {"optimizer", "scheduler", "scaler", "rng", "config", "world", "best_psnr"}
    assert state["config"] == dataclasses.asdict(cfg) and state["scaler"] is None and state["world"] == 1
    assert state["rng"]["torch"].dtype == torch.uint8 and state["rng"]["cuda"] is None
    assert state["scheduler"]["last_epoch"] == 3
    assert last["val"] == result["val"]
    assert set(result["val"]) == {"psnr", "ssim", "bicubic_psnr", "bicubic_ssim", "images"}
    # best.pt is an exported model: no training state, loadable for inference
    best = load_checkpoint(result["best_checkpoint"], task="sr", scale=2)
    assert best["train"] is None and best["step"] in (2, 3)
    assert isinstance(model_from_checkpoint(best, backend="torch"), nn.Module)
    lines = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"), encoding="utf-8")]
    assert [line["step"] for line in lines] == [2, 3]
    assert lines[-1]["val"] == result["val"]


def test_same_config_gives_the_same_weights(tmp_path):
    one, _ = fit(tiny(tmp_path, "one", steps=2))
    two, _ = fit(tiny(tmp_path, "two", steps=2))
    assert_same_weights(one.state_dict(), two.state_dict(), "two runs of one config")
    other, _ = fit(tiny(tmp_path, "other", steps=2, seed=1))
    assert not torch.equal(one.state_dict()["feature_extractor.0.weight"],
                           other.state_dict()["feature_extractor.0.weight"])


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """6 steps in one go == 4 steps, then a resume from the step-4 checkpoint: with 3 steps an epoch
    the resumed run starts one batch into epoch 1 (sampler indices skipped, not batches loaded)."""
    save = train_module.save_checkpoint

    def keep_every_last(path, **kwargs):  # the step-4 last.pt is what an interruption would leave
        save(path, **kwargs)
        if os.path.basename(path) == "last.pt":
            shutil.copy(path, os.path.join(os.path.dirname(path), f"last-{kwargs['step']}.pt"))

    monkeypatch.setattr(train_module, "save_checkpoint", keep_every_last)
    run = dict(steps=6, epoch_steps=3, ckpt_every=4, warmup=2, val_every=2)
    whole, _ = fit(tiny(tmp_path, "whole", **run))
    torch.manual_seed(1234)  # nothing may depend on the global RNG the resumed process starts with
    resumed, result = fit(tiny(tmp_path, "resumed", resume=str(tmp_path / "whole" / "last-4.pt"), **run))
    assert result["step"] == 6
    assert_same_weights(whole.state_dict(), resumed.state_dict(), "resumed run vs uninterrupted run")
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True)["train"] for r in ("whole", "resumed"))
    assert a["optimizer"]["state"][0]["step"].item() == b["optimizer"]["state"][0]["step"].item() == 6
    assert a["scheduler"] == b["scheduler"]
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


def test_learning_rate_warms_up_then_decays_to_zero(tmp_path):
    cfg = tiny(tmp_path, steps=6, warmup=2, lr=1e-3, val_every=1)
    train(cfg)
    lines = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"), encoding="utf-8")]
    # the rate after step s is that of step s+1 (counting from 0): warm-up 1/2, 2/2, then cosine
    # from 1 at step 2 to 0 at step 6
    cosine = [(1 + math.cos(math.pi * k / 4)) / 2 for k in range(5)]
    expect = [1e-3 * f for f in [1.0, *cosine]]
    assert [line["lr"] for line in lines] == pytest.approx(expect, abs=1e-12)


def _checkpoint(tmp_path, name, spec, train_state=True):
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, model=build_model(spec, backend="torch"), step=1, train={} if train_state else None)
    return str(path)


SR8 = {"name": "AttentionSRNet", "kwargs": {"num_channels": 3, "num_features": 8, "num_blocks": 1, "scale": 2}}


@pytest.mark.parametrize(("changes", "message"), [
    (dict(task="denoise"), r"task = 'denoise'; expected 'sr' or 'inpaint'"),
    (dict(steps=0), r"steps = 0; expected a positive integer"),
    (dict(batch_size=0), r"batch_size = 0; expected a positive integer"),
    (dict(task="inpaint", patch=18, val_size=32), r"patch = 18; expected a multiple of 4"),
    (dict(scale=5), r"scale = 5; expected 2, 3 or 4"),
    (dict(amp="fp8"), r"amp = 'fp8'; expected one of 'auto', 'bf16', 'fp16', 'off'"),
    (dict(amp="fp16"), r"amp = 'fp16' needs a CUDA device but training runs on cpu"),
    (dict(amp="bf16"), r"amp = 'bf16' needs a CUDA device"),
    (dict(backend="fast"), r"backend = 'fast'; expected one of 'naive', 'torch', 'triton', 'auto'"),
    (dict(warmup=4), r"warmup = 4 but steps = 4; expected warmup < steps"),
])
def test_config_errors(tmp_path, changes, message):
    with pytest.raises(InputError, match=message):
        train(tiny(tmp_path, **changes))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("spec", "changes", "message"), [
    ({"name": "ImageInpaintingModel", "kwargs": {"in_channels": 4, "out_channels": 3, "heads": 1}}, {},
     r"holds an inpainting network \(ImageInpaintingModel\); expected a super-resolution network"),
    ({**SR8, "kwargs": {**SR8["kwargs"], "scale": 3}}, {}, r"upscales ×3; expected ×2"),
    ({**SR8, "kwargs": {**SR8["kwargs"], "num_features": 16}}, {},
     r"holds AttentionSRNet\(num_channels=3, num_features=16, num_blocks=1, scale=2\) but the config builds "
     r"AttentionSRNet\(num_channels=3, num_features=8, num_blocks=1, scale=2\)"),
    (SR8, {"train_state": False}, r"has no training state \(an exported model\)"),
])
def test_resume_from_another_network_is_refused(tmp_path, spec, changes, message):
    path = _checkpoint(tmp_path, "other", spec, **changes)
    with pytest.raises(InputError, match=message):
        train(tiny(tmp_path, resume=path))


class _Bicubic(nn.Module):
    """A "network" that is the bicubic baseline (one unused parameter: validate finds its device)."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return data.bicubic_up(x, self.scale)


def test_validate_reports_the_bicubic_baseline():
    cfg = TrainConfig(task="sr", out="unused", scale=3, val_size=40)
    _, val_photos = data.split_photos(data.load_photos(), cfg.val)
    cases = validation_cases(val_photos, cfg)
    name, lr, hr = cases[0]
    bicubic = data.bicubic_up(lr, 3)
    model = _Bicubic(3).train()
    got = validate(model, cases, cfg)
    assert got["images"] == len(cases) == 1 and name == "chelsea"
    assert got["bicubic_psnr"] == pytest.approx(metrics.psnr(bicubic, hr, crop=3, y_channel=True).item(), rel=1e-12)
    assert got["bicubic_ssim"] == pytest.approx(metrics.ssim(bicubic, hr, crop=3, y_channel=True).item(), rel=1e-12)
    # a network that computes the baseline scores it, and validate leaves the model's mode as it was
    assert got["psnr"] == pytest.approx(got["bicubic_psnr"]) and got["ssim"] == pytest.approx(got["bicubic_ssim"])
    assert 20 < got["bicubic_psnr"] < 60 and model.training


def test_inpaint_runs_at_patch_16_with_a_progress_bar(tmp_path, capsys):
    cfg = TrainConfig(task="inpaint", out=str(tmp_path / "inpaint"), steps=2, batch_size=2, patch=16, val_size=32,
                      backend="torch", device="cpu")
    result = train(cfg)
    assert result["step"] == 2 and set(result["val"]) == {"psnr_hole", "psnr", "ssim", "images"}
    assert all(torch.isfinite(torch.tensor(v)) for v in result["val"].values())
    assert result["val"]["psnr"] > result["val"]["psnr_hole"]  # the known pixels are kept exactly
    assert load_checkpoint(result["checkpoint"], task="inpaint")["model"]["kwargs"]["heads"] == 1
    err = capsys.readouterr().err  # not a terminal: plain lines, the last at the end of training
    assert "train inpaint: step 2/2 (100%)  loss " in err and "\r" not in err, f"progress on stderr: {err[-300:]!r}"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_into_a_log_is_a_readable_line_every_interval(monkeypatch):
    """Into a file or pipe: one plain line per interval and one at the end, no carriage returns;
    on a terminal: tqdm's bar, redrawn in place."""
    clock = [0.0]
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: clock[0])
    log = io.StringIO()
    progress = train_module.Progress(1000, 0, "train sr", stream=log, interval=10.0)
    for step in range(1000):  # 125 s at 8 steps/s
        clock[0] += 0.125
        progress.update(1)
        if step % 10 == 9:
            progress.set_loss(0.5)
    progress.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 13, lines  # at 10 s, 20 s, ... 120 s, and the end
    assert lines[0] == "train sr: step 80/1000 (8%)  loss 0.5000  8.0 steps/s  eta 1m55s", lines[0]
    assert lines[-1] == "train sr: step 1000/1000 (100%)  loss 0.5000  8.0 steps/s", lines[-1]

    terminal = _Terminal()
    bar = train_module.Progress(5, 0, "train sr", stream=terminal)
    for _ in range(5):
        bar.update(1)
    bar.close()
    assert "\r" in terminal.getvalue() and "5/5" in terminal.getvalue()


def test_triton_backend_trains(tmp_path):
    """One step through the fused gating kernels (on CPU: Triton's interpreter)."""
    result = train(tiny(tmp_path, steps=1, backend="triton", device=None, val_size=19))
    assert result["step"] == 1 and result["val"]["psnr"] > 0


@needs_gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_on_gpu(tmp_path, amp):
    result = train(tiny(tmp_path, steps=3, amp=amp, device=None, backend="auto"))
    state = torch.load(result["checkpoint"], weights_only=True)["train"]
    assert (state["scaler"] is not None) == (amp == "fp16") and len(state["rng"]["cuda"]) == 1
    assert math.isfinite(result["train_loss"]) and result["val"]["psnr"] > 0


_RANK_MAIN = """
import json, os, sys
import torch
from attnsr.train import TrainConfig, fit
net, result = fit(TrainConfig(**json.loads(sys.argv[1])))
torch.save(net.state_dict(), os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_end_with_identical_weights(tmp_path):
    """torchrun's environment by hand: two CPU processes (gloo), DistributedDataParallel."""
    cfg = tiny(tmp_path, steps=3)
    # OMP_NUM_THREADS=1 as torchrun sets it: two processes share the cores
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_MAIN, json.dumps(dataclasses.asdict(cfg)), str(tmp_path)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for r, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=120)
        finally:
            p.kill()
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{err[-2000:]}"
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert_same_weights(rank0, rank1, "rank 0 vs rank 1")
    torch.manual_seed(cfg.seed)
    initial = build_network(cfg).state_dict()
    assert not torch.equal(initial["feature_extractor.0.weight"], rank0["feature_extractor.0.weight"])
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["train"]["world"] == 2
    assert_same_weights(ckpt["state_dict"], rank0, "rank 0's last.pt vs its weights")



def test_triton_on_the_cpu_without_the_interpreter_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InputError, match=r"backend = 'triton' on the CPU needs TRITON_INTERPRET=1"):
        train(tiny(tmp_path, backend="triton"))
