"""Checkpoints shared by training and inference: what a file holds, how it is written and read.

A checkpoint is a plain dict, loadable with ``torch.load(..., weights_only=True)``::

    {"format": "attnsr-checkpoint/1",
     "task": "sr" | "inpaint",
     "model": {"name": "AttentionSRNet" | "ImageInpaintingModel", "kwargs": {...}},  # plain ints/strs
     "state_dict": {...},            # model weights (backend-independent keys)
     "step": int,                    # optimizer steps taken
     "train": {...} | None}          # training state for --resume: optimizer, scheduler, scaler,
                                     # RNG states, the training config; None in an exported model

Files are written atomically (temporary file + rename), so a crash never leaves a broken one.
"""

import os

import torch

from attnsr.images import InputError, atomic_write, first_line
from attnsr.models import AttentionSRNet, ImageInpaintingModel

FORMAT = "attnsr-checkpoint/1"
MODELS = {"AttentionSRNet": AttentionSRNet, "ImageInpaintingModel": ImageInpaintingModel}
TASK_OF = {"AttentionSRNet": "sr", "ImageInpaintingModel": "inpaint"}
TASK_NAME = {"sr": "a super-resolution", "inpaint": "an inpainting"}


class NotACheckpoint(InputError):
    """The file exists but is not an attnsr checkpoint (unreadable with ``weights_only=True``, or
    another format): ``attnsr upscale`` then tries it as a published network (:mod:`attnsr.published`)."""


def model_spec(model) -> dict:
    """{"name", "kwargs"} of a network built by :func:`build_model` (kwargs kept on the model)."""
    kwargs = getattr(model, "attnsr_kwargs", None)
    name = type(model).__name__
    if name not in MODELS or kwargs is None:
        raise ValueError(f"model_spec: {name} was not built by attnsr.checkpoint.build_model")
    return {"name": name, "kwargs": dict(kwargs)}


def build_model(spec: dict, backend: str = "auto"):
    """Build the network a spec names, remembering its kwargs for :func:`model_spec`."""
    name = spec.get("name")
    if name not in MODELS:
        raise InputError(f"unknown network {name!r}; expected one of {', '.join(MODELS)}")
    kwargs = dict(spec.get("kwargs", {}))
    model = MODELS[name](**kwargs, backend=backend)
    model.attnsr_kwargs = kwargs
    return model


def save_checkpoint(path, *, model, step: int, train: dict | None = None, extra: dict | None = None) -> None:
    """Write a checkpoint of ``model`` (unwrapped from DDP) atomically to ``path``."""
    model = getattr(model, "module", model)
    spec = model_spec(model)
    payload = {
        "format": FORMAT,
        "task": TASK_OF[spec["name"]],
        "model": spec,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "step": int(step),
        "train": train,
    }
    if extra:
        payload.update(extra)
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path, *, task: str | None = None, scale: int | None = None) -> dict:
    """Read a checkpoint with ``weights_only=True`` and check it is for ``task`` (and ``scale``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means "not a checkpoint we can read"
        raise NotACheckpoint(f"cannot read checkpoint {path}: {first_line(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise NotACheckpoint(f"{path} is not an attnsr checkpoint (expected format {FORMAT})")
    if task is not None and ckpt["task"] != task:
        raise InputError(f"checkpoint {path} holds {TASK_NAME[ckpt['task']]} network ({ckpt['model']['name']}); "
                         f"expected {TASK_NAME[task]} network")
    got_scale = ckpt["model"]["kwargs"].get("scale")
    if scale is not None and got_scale != scale:
        raise InputError(f"checkpoint {path} upscales ×{got_scale}; expected ×{scale}")
    return ckpt


def model_from_checkpoint(ckpt: dict, backend: str = "auto"):
    """The network of a loaded checkpoint with its weights, in eval mode."""
    model = build_model(ckpt["model"], backend=backend)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise InputError(f"checkpoint weights do not fit {ckpt['model']['name']}: "
                         f"{str(e).splitlines()[0]}") from None
    return model.eval()
