"""Training for both networks: AdamW on an L1 loss, cosine schedule, AMP, checkpoints, exact resume, DDP.

    from attnsr.train import TrainConfig, train
    result = train(TrainConfig(task="sr", out="runs/sr", steps=2000))
    result["val"]  # {"psnr": ..., "ssim": ..., "bicubic_psnr": ..., "bicubic_ssim": ..., "images": ...}

What is optimised:

- ``sr``: L1 between the network's output (not clamped) and the HR patch, both in [0, 1].
- ``inpaint``: L1 between the Tanh output and the whole image scaled to [-1, 1], known pixels
  included (the usual choice: the loss weighs every pixel alike and the network learns to pass the
  known ones through; inference keeps them anyway, :func:`attnsr.data.inpaint_blend`).

Learning rate: linear warm-up from lr/warmup to lr over ``warmup`` steps, then cosine decay to 0 at
``steps`` (a ``LambdaLR``). AMP: ``torch.autocast`` in bf16 or fp16 on CUDA, with a ``GradScaler``
for fp16 only; the loss is computed in fp32. Validation runs under the same autocast as training.

Data order: an epoch is ``epoch_steps`` optimizer steps of ``batch_size`` patches per process. The
``DistributedSampler`` permutation (seeded with seed + epoch) and the patches themselves (seeded with
seed, epoch, index) make the batch at step s a pure function of (seed, s, rank) for a given batch
size, world size and epoch_steps. Resume starts the sampler (s mod epoch_steps)·batch_size indices
into its epoch, so a resumed run continues exactly as if never interrupted: bitwise on CPU with
workers=0; on CUDA up to the nondeterminism of the kernels.

Files in ``out``: ``last.pt`` (every ckpt_every steps and at the end; resume from it), ``best.pt``
(the weights with the best validation PSNR, no training state) and ``metrics.jsonl`` (one JSON
object per validation). All checkpoints load with ``torch.load(weights_only=True)``; see
:mod:`attnsr.checkpoint` for the format and the ``train`` entry below for the training state.

Distributed: under torchrun (WORLD_SIZE > 1 in the environment) :func:`train` joins the process group
(nccl on CUDA, gloo on CPU; the CUDA device is LOCAL_RANK) unless the caller already did, and wraps
the network in ``DistributedDataParallel``. Rank 0 alone validates, writes files and shows progress.
"""

import contextlib
import dataclasses
import itertools
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from attnsr import data, metrics
from attnsr.backends import BACKENDS
from attnsr.checkpoint import build_model, load_checkpoint, save_checkpoint
from attnsr.data import DEFAULT_VAL
from attnsr.images import InputError

__all__ = ["TrainConfig", "build_network", "fit", "network_spec", "train", "validate", "validation_cases"]

TASKS = ("sr", "inpaint")
AMP_MODES = ("auto", "bf16", "fp16", "off")
LOG_EVERY = 10  # steps between progress-bar loss reads (each read waits for the GPU)
# Config fields that change the batches or the updates: resuming with other values cannot match an
# uninterrupted run, which is said in a warning.
_RUN_FIELDS = ("data", "val", "steps", "batch_size", "patch", "lr", "weight_decay", "warmup", "epoch_steps",
               "amp", "grad_clip", "seed")


@dataclasses.dataclass
class TrainConfig:
    task: str                       # "sr" | "inpaint"
    out: str                        # folder: last.pt, best.pt, metrics.jsonl
    data: str | None = None         # image folder; None = photos bundled with scikit-image
    val: str = DEFAULT_VAL          # held-out photo names (comma-separated) or a count, for data.split_photos
    steps: int = 2000               # optimizer steps in all
    batch_size: int = 16            # patches per step and process
    patch: int = 48                 # sr: LR patch size; inpaint: image patch (multiple of 4)
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup: int = 0                 # linear warm-up steps, then cosine decay to 0 at `steps`
    scale: int = 2                  # sr only: 2, 3 or 4
    features: int = 64              # sr: num_features
    blocks: int = 16                # sr: num_blocks
    heads: int = 1                  # inpaint: attention heads (must divide 64)
    backend: str = "auto"           # attention backend: naive, torch, triton, auto
    amp: str = "auto"               # "auto" (bf16 on CUDA, fp16 without bf16; off on CPU), "bf16", "fp16", "off"
    grad_clip: float = 0.0          # max global gradient norm; 0 = no clipping
    val_every: int = 500            # steps between validations (and one at the end)
    ckpt_every: int = 500           # steps between last.pt writes (and one at the end)
    val_size: int = 256             # validation: sr HR centre-crop bound; inpaint crop size (multiple of 4)
    epoch_steps: int = 100          # steps per data epoch: samples_per_epoch = batch_size·world·epoch_steps
    seed: int = 0
    resume: str | None = None       # last.pt to continue from
    device: str | None = None       # default: cuda (LOCAL_RANK under torchrun) if available, else cpu
    workers: int = 0                # DataLoader workers
    progress: bool = True           # progress on stderr (rank 0): a bar on a terminal, else a line every 10 s


# ----------------------------------------------------------------------------------------------
# Checking the configuration
# ----------------------------------------------------------------------------------------------


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_config(cfg: TrainConfig) -> None:
    """Raise :class:`InputError` (one line: what was given, what was expected) for a bad config."""
    _check(cfg.task in TASKS, f"task = {cfg.task!r}; expected 'sr' or 'inpaint'")
    _check(isinstance(cfg.out, (str, os.PathLike)) and os.fspath(cfg.out) != "",
           f"out = {cfg.out!r}; expected the path of a folder for last.pt, best.pt and metrics.jsonl")
    for name in ("steps", "batch_size", "patch", "features", "blocks", "heads", "val_every", "ckpt_every",
                 "val_size", "epoch_steps"):
        value = getattr(cfg, name)
        _check(_is_int(value) and value > 0, f"{name} = {value!r}; expected a positive integer")
    for name in ("warmup", "workers", "seed"):
        value = getattr(cfg, name)
        _check(_is_int(value) and value >= 0, f"{name} = {value!r}; expected an integer ≥ 0")
    _check(cfg.warmup < cfg.steps, f"warmup = {cfg.warmup} but steps = {cfg.steps}; expected warmup < steps")
    _check(_is_number(cfg.lr) and cfg.lr > 0, f"lr = {cfg.lr!r}; expected a positive number")
    for name in ("weight_decay", "grad_clip"):
        value = getattr(cfg, name)
        _check(_is_number(value) and value >= 0, f"{name} = {value!r}; expected a number ≥ 0")
    _check(cfg.amp in AMP_MODES, f"amp = {cfg.amp!r}; expected one of {', '.join(map(repr, AMP_MODES))}")
    _check(cfg.backend in BACKENDS, f"backend = {cfg.backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    if cfg.task == "sr":
        _check(cfg.scale in (2, 3, 4), f"scale = {cfg.scale!r}; expected 2, 3 or 4")
        # SSIM's 11×11 window must fit once `scale` pixels are cropped at each border
        smallest = 11 + 2 * cfg.scale
        _check(cfg.val_size >= smallest, f"val_size = {cfg.val_size} is too small for ×{cfg.scale} validation; "
                                         f"expected ≥ {smallest} (SSIM window after the {cfg.scale}-pixel border crop)")
    else:
        _check(cfg.patch % 4 == 0, f"patch = {cfg.patch}; expected a multiple of 4 (two stride-2 stages)")
        _check(cfg.val_size % 4 == 0 and cfg.val_size >= 12,
               f"val_size = {cfg.val_size}; expected a multiple of 4, at least 12 (SSIM's 11×11 window)")
        _check(64 % cfg.heads == 0, f"heads = {cfg.heads}; expected a divisor of 64 (the narrowest attention)")


def _pick_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, TypeError):
        raise InputError(f"device = {cfg.device!r}; expected 'cpu', 'cuda' or 'cuda:N'") from None
    _check(device.type in ("cpu", "cuda"), f"device = {cfg.device!r}; expected 'cpu', 'cuda' or 'cuda:N'")
    if device.type == "cuda":
        _check(torch.cuda.is_available(), f"device = {cfg.device!r} but CUDA is not available; expected 'cpu'")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        _check(device.index < torch.cuda.device_count(),
               f"device = {device} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif cfg.backend == "triton":
        _check(os.environ.get("TRITON_INTERPRET") == "1",
               "backend = 'triton' on the CPU needs TRITON_INTERPRET=1 (Triton's slow interpreter, set before "
               "triton is imported); expected backend 'auto' or 'torch' on the CPU")
    return device


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` setting on ``device``, None for full precision."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    _check(device.type == "cuda", f"amp = {amp!r} needs a CUDA device but training runs on {device}; "
                                  "expected amp='off' or 'auto' (full precision on CPU)")
    bf16_ok = torch.cuda.is_bf16_supported()
    if amp == "auto":
        return torch.bfloat16 if bf16_ok else torch.float16
    _check(amp != "bf16" or bf16_ok, f"amp = 'bf16' but {torch.cuda.get_device_name(device)} has no bfloat16; "
                                     "expected amp='fp16' or 'auto'")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Network, data, validation
# ----------------------------------------------------------------------------------------------


def network_spec(cfg: TrainConfig) -> dict:
    """The checkpoint's {"name", "kwargs"} of the network ``cfg`` trains."""
    if cfg.task == "sr":
        return {"name": "AttentionSRNet",
                "kwargs": {"num_channels": 3, "num_features": cfg.features, "num_blocks": cfg.blocks,
                           "scale": cfg.scale}}
    return {"name": "ImageInpaintingModel", "kwargs": {"in_channels": 4, "out_channels": 3, "heads": cfg.heads}}


def build_network(cfg: TrainConfig) -> nn.Module:
    """The network of ``cfg`` (on CPU, freshly initialised from torch's global RNG)."""
    return build_model(network_spec(cfg), backend=cfg.backend)


def _describe(spec: dict) -> str:
    return f"{spec['name']}({', '.join(f'{k}={v}' for k, v in spec['kwargs'].items())})"


def validation_cases(photos, cfg: TrainConfig) -> list:
    """The held-out cases :func:`validate` measures: sr (name, LR, HR) pairs with the HR centre crop
    bounded by val_size; inpaint (name, image, mask) crops of val_size with fixed masks."""
    if cfg.task == "sr":
        return data.val_sr_pairs(photos, cfg.scale, max_size=cfg.val_size)
    return data.val_inpaint_cases(photos, cfg.val_size)


@torch.no_grad()
def validate(model: nn.Module, cases, cfg: TrainConfig) -> dict:
    """Mean metrics of ``model`` over ``cases`` (from :func:`validation_cases`), one value per photo.

    sr: the output on each whole LR image (eval mode, clamped to [0, 1]) against HR, PSNR and SSIM on
    Y with a ``scale``-pixel border crop, and the bicubic baseline beside them -> {"psnr", "ssim",
    "bicubic_psnr", "bicubic_ssim", "images"}. inpaint: the network's prediction blended into the
    known pixels against the image, PSNR inside the hole and over the whole image, SSIM over the whole
    image (Y channel, no crop) -> {"psnr_hole", "psnr", "ssim", "images"}. Runs on the model's device
    under cfg.amp's autocast; the model's train/eval mode is restored afterwards.
    """
    net = getattr(model, "module", model)  # validate the DDP-wrapped network without its hooks
    if not cases:
        raise InputError("validate: no validation cases; expected at least one held-out photo")
    device = next(net.parameters()).device
    amp = _amp_dtype(cfg.amp, device)
    was_training = net.training
    net.eval()
    rows = []
    try:
        for _name, a, b in cases:
            a, b = a.to(device), b.to(device)
            if cfg.task == "sr":
                lr, hr = a, b
                with _autocast(device, amp):
                    out = net(lr)
                out = out.float().clamp(0, 1)
                bicubic = data.bicubic_up(lr, cfg.scale)
                kw = dict(crop=cfg.scale, y_channel=True)
                rows.append({"psnr": metrics.psnr(out, hr, **kw), "ssim": metrics.ssim(out, hr, **kw),
                             "bicubic_psnr": metrics.psnr(bicubic, hr, **kw),
                             "bicubic_ssim": metrics.ssim(bicubic, hr, **kw)})
            else:
                image, mask = a, b
                with _autocast(device, amp):
                    pred = net(data.inpaint_input(image, mask))
                out = data.inpaint_blend(pred.float(), image, mask)
                rows.append({"psnr_hole": metrics.psnr(out, image, mask=mask), "psnr": metrics.psnr(out, image),
                             "ssim": metrics.ssim(out, image)})
    finally:
        net.train(was_training)
    result = {k: float(torch.cat([r[k] for r in rows]).mean()) for k in rows[0]}
    result["images"] = len(rows)
    return result


# ----------------------------------------------------------------------------------------------
# Pieces of the loop
# ----------------------------------------------------------------------------------------------


class _EpochSampler(DistributedSampler):
    """A DistributedSampler (shuffle, drop_last) that can start ``skip`` indices into an epoch."""

    def __init__(self, dataset, *, world: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def start(self, epoch: int, skip: int) -> None:
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return super().__len__() - self.skip


def _schedule(cfg: TrainConfig):
    """LambdaLR factor: linear warm-up (step+1)/warmup, then cosine from 1 to 0 at ``steps``."""

    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = min(1.0, (step - cfg.warmup) / (cfg.steps - cfg.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _training_data(photos, cfg: TrainConfig, world: int, rank: int, device: torch.device):
    """(dataset, sampler, loader) of this process's training batches: epochs of epoch_steps steps."""
    samples = cfg.batch_size * world * cfg.epoch_steps
    if cfg.task == "sr":
        dataset = data.SRPatches(photos, scale=cfg.scale, patch=cfg.patch, samples_per_epoch=samples, seed=cfg.seed)
    else:
        dataset = data.InpaintPatches(photos, patch=cfg.patch, samples_per_epoch=samples, seed=cfg.seed)
    sampler = _EpochSampler(dataset, world=world, rank=rank, seed=cfg.seed)
    # the loader's own generator (worker seeds) keeps it off torch's global RNG
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))
    return dataset, sampler, loader


def _load_resume(cfg: TrainConfig, world: int) -> dict:
    """The resume checkpoint, checked against the config (task, network, scale, step)."""
    ckpt = load_checkpoint(cfg.resume, task=cfg.task, scale=cfg.scale if cfg.task == "sr" else None)
    want = network_spec(cfg)
    _check(ckpt["model"] == want, f"checkpoint {cfg.resume} holds {_describe(ckpt['model'])} but the config "
                                  f"builds {_describe(want)}; expected the same network")
    _check(isinstance(ckpt.get("train"), dict), f"checkpoint {cfg.resume} has no training state (an exported "
                                                "model); expected the last.pt of a training run")
    _check(ckpt["step"] <= cfg.steps, f"checkpoint {cfg.resume} is at step {ckpt['step']} but steps = "
                                      f"{cfg.steps}; expected steps ≥ the checkpoint's step")
    saved = ckpt["train"].get("config", {})
    now = dataclasses.asdict(cfg)
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in _RUN_FIELDS if k in saved and saved[k] != now[k]]
    if ckpt["train"].get("world", world) != world:
        changed.append(f"processes {ckpt['train']['world']} -> {world}")
    if changed:
        warnings.warn(f"resuming {cfg.resume} with other settings ({'; '.join(changed)}): the run will not "
                      "match an uninterrupted one", stacklevel=3)
    return ckpt


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line that is not one (cut short by a crash)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class Progress:
    """Training progress on stderr: a tqdm bar redrawn in place on a terminal; into a log file or a
    pipe (CI, ``make demo > log 2>&1``), a plain line every ``interval`` seconds at most and one at
    the end, never carriage returns.

    ``update(n)`` counts steps, ``set_loss(x)`` sets the loss shown, ``write(text)`` prints a line
    (validation) on stdout without breaking the bar.
    """

    def __init__(self, total: int, initial: int, desc: str, *, enabled: bool = True, stream=None,
                 interval: float = 10.0):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.step, self.desc, self.loss = total, initial, desc, None
        self.disable = not enabled
        self.interval = interval
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream, disable=self.disable or not tty,
                        dynamic_ncols=True, mininterval=0.1) if tty else None
        self.started = self.last = time.perf_counter()
        self.first = initial

    def update(self, n: int = 1) -> None:
        self.step += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.disable and time.perf_counter() - self.last >= self.interval:
            self._line()

    def set_loss(self, loss: float) -> None:
        self.loss = loss
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def write(self, text: str) -> None:
        if self.bar is not None:
            tqdm.write(text)
        else:
            print(text, flush=True)

    def _line(self) -> None:
        now = time.perf_counter()
        self.last = now
        rate = (self.step - self.first) / max(now - self.started, 1e-9)
        eta = f"  eta {_duration((self.total - self.step) / rate)}" if rate > 0 and self.step < self.total else ""
        loss = f"  loss {self.loss:.4f}" if self.loss is not None else ""
        print(f"{self.desc}: step {self.step}/{self.total} ({100 * self.step / max(self.total, 1):.0f}%){loss}  "
              f"{rate:.1f} steps/s{eta}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif not self.disable and self.step > self.first:
            self._line()


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class _Log:
    """Validation lines: printed through the progress display and appended to out/metrics.jsonl (rank 0 only)."""

    def __init__(self, path: str, resume_step: int | None, progress: Progress):
        self.path, self.progress = path, progress
        kept = []
        if resume_step is not None and os.path.isfile(path):  # drop what came after the resume point
            with open(path, encoding="utf-8") as f:
                kept = [line for line in f if _logged_step(line) <= resume_step]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def write(self, record: dict, task: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        v = record["val"]
        if task == "sr":
            what = (f"psnr {v['psnr']:.2f} dB (bicubic {v['bicubic_psnr']:.2f})  "
                    f"ssim {v['ssim']:.4f} (bicubic {v['bicubic_ssim']:.4f})")
        else:
            what = f"psnr hole {v['psnr_hole']:.2f} dB  psnr {v['psnr']:.2f} dB  ssim {v['ssim']:.4f}"
        self.progress.write(f"step {record['step']}  loss {record['train_loss']:.4f}  lr {record['lr']:.3g}  {what}")


def _join_process_group(device: torch.device) -> bool:
    """Join torchrun's process group (env:// rendezvous) unless there is none or it exists already;
    True when this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return True


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict:
    """Train the network ``cfg`` describes; see the module docstring for the loss, schedule and files.

    Returns {"step", "checkpoint" (path of last.pt), "best_checkpoint", "val" (the last validation's
    metrics, see :func:`validate`), "train_loss" (mean over the steps since the previous validation,
    all processes), "seconds" (wall time of this call), "steps_per_s" (steps of this call per second
    of training, validation and checkpoint writes excluded), "world_size"}; the same on every rank.
    """
    return fit(cfg)[1]


def fit(cfg: TrainConfig) -> tuple[nn.Module, dict]:
    """:func:`train`, also returning the trained network (unwrapped from DDP, on its device)."""
    started = time.perf_counter()
    check_config(cfg)
    device = _pick_device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    amp = _amp_dtype(cfg.amp, device)
    created_group = _join_process_group(device)
    try:
        return _fit(cfg, device, amp, started)
    finally:
        if created_group:
            dist.destroy_process_group()


def _fit(cfg: TrainConfig, device: torch.device, amp: torch.dtype | None, started: float):
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if distributed and device.type == "cuda":
        torch.cuda.set_device(device)  # the device of nccl's collectives (broadcast_object_list)
    ckpt = _load_resume(cfg, world) if cfg.resume else None
    start_step = ckpt["step"] if ckpt else 0
    last_path, best_path = os.path.join(cfg.out, "last.pt"), os.path.join(cfg.out, "best.pt")

    train_photos, val_photos = data.split_photos(data.load_photos(cfg.data), cfg.val)
    dataset, sampler, loader = _training_data(train_photos, cfg, world, rank, device)
    cases = validation_cases(val_photos, cfg) if rank == 0 else None
    log = None
    bar = Progress(cfg.steps, start_step, f"train {cfg.task}", enabled=cfg.progress and rank == 0)
    if rank == 0:
        _check(not os.path.exists(cfg.out) or os.path.isdir(cfg.out), f"out = {cfg.out!r} is a file; expected a folder")
        os.makedirs(cfg.out, exist_ok=True)
        log = _Log(os.path.join(cfg.out, "metrics.jsonl"), start_step if ckpt else None, bar)

    torch.manual_seed(cfg.seed)
    net = build_network(cfg)
    if ckpt:
        net.load_state_dict(ckpt["state_dict"])
    net = net.to(device)
    model = net
    if distributed:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    best = None
    if ckpt:  # after the scheduler, whose construction sets the learning rate the optimizer restores
        state = ckpt["train"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda"):
            torch.cuda.set_rng_state(state["rng"]["cuda"][0], device)
        best = state.get("best_psnr")
    last_val = ckpt.get("val") if ckpt else None

    def training_state() -> dict:
        return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else None},
                "config": dataclasses.asdict(cfg), "world": world, "best_psnr": best}

    def step_on(batch) -> torch.Tensor:
        batch = [t.to(device, non_blocking=True) for t in batch]
        if cfg.task == "sr":
            x, target = batch
        else:
            x, _mask, image = batch
            target = image * 2 - 1
        with _autocast(device, amp):
            out = model(x)
        loss = F.l1_loss(out.float(), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        return loss.detach()

    loss_sum = torch.zeros((), device=device)  # since the last validation (read only then)
    window, window_steps = torch.zeros((), device=device), 0  # since the last progress-bar update
    since_val, train_loss = 0, None
    paused = 0.0  # seconds spent validating and writing checkpoints
    loop_started = time.perf_counter()
    step = start_step
    model.train()
    while step < cfg.steps:
        epoch, offset = divmod(step, cfg.epoch_steps)
        dataset.set_epoch(epoch)
        sampler.start(epoch, offset * cfg.batch_size)
        for batch in loader:
            loss = step_on(batch)
            step += 1
            since_val += 1
            loss_sum += loss
            bar.update(1)
            if not bar.disable:
                window += loss
                window_steps += 1
                if window_steps == LOG_EVERY or step == cfg.steps:
                    bar.set_loss(window.item() / window_steps)
                    window.zero_()
                    window_steps = 0
            do_val = step % cfg.val_every == 0 or step == cfg.steps
            do_ckpt = step % cfg.ckpt_every == 0 or step == cfg.steps
            if do_val or do_ckpt:
                pause = time.perf_counter()
                if do_val:
                    if distributed:
                        dist.all_reduce(loss_sum)
                    train_loss = loss_sum.item() / (since_val * world)
                    loss_sum.zero_()
                    since_val = 0
                    if rank == 0:
                        last_val = validate(net, cases, cfg)
                        log.write({"step": step, "train_loss": train_loss, "lr": scheduler.get_last_lr()[0],
                                   "val": last_val, "seconds": time.perf_counter() - started}, cfg.task)
                        if best is None or last_val["psnr"] > best:
                            best = last_val["psnr"]
                            save_checkpoint(best_path, model=net, step=step, extra={"val": last_val})
                if do_ckpt and rank == 0:
                    save_checkpoint(last_path, model=net, step=step, train=training_state(), extra={"val": last_val})
                paused += time.perf_counter() - pause
            if step == cfg.steps:
                break
    bar.close()
    if step == start_step and rank == 0:  # resumed at the end: validate and keep what was loaded
        last_val = validate(net, cases, cfg)
        save_checkpoint(last_path, model=net, step=step, train=training_state(), extra={"val": last_val})
    trained = time.perf_counter() - loop_started - paused
    result = {"step": step, "checkpoint": last_path, "best_checkpoint": best_path, "val": last_val,
              "train_loss": train_loss, "seconds": time.perf_counter() - started,
              "steps_per_s": (step - start_step) / trained if trained > 0 else None, "world_size": world}
    if distributed:  # every rank returns rank 0's result, once its files are written
        shared = [result]
        dist.broadcast_object_list(shared, src=0)
        result = shared[0]
    return net, result
