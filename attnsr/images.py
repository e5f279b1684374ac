"""Reading and writing images for the command line, and the one error type it reports.

Images in memory are float32 tensors (3, H, W) with values in [0, 1] (RGB); masks are (1, H, W)
with 1 = hole. Files are written atomically: to a temporary file beside the target, renamed over
it only once complete, so an interrupted or failed write never leaves a half-written file.
"""

import contextlib
import os
import tempfile

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class InputError(ValueError):
    """Bad input from the user (a missing image, a mask of the wrong size, the wrong checkpoint).

    The command line prints its message as one line and exits non-zero.
    """


def first_line(err: Exception) -> str:
    """The first line of an exception's message (its class name when it has none): what an
    InputError quotes of the error behind it."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pillow comes with the package; say how to get it back
        raise ImportError("attnsr needs Pillow to read and write images: pip install pillow") from e
    return Image


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"cannot write {path}: folder {folder} does not exist")
    base, suffix = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f"{suffix}.part", dir=folder)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_image(path) -> torch.Tensor:
    """Read a PNG or JPEG as float32 RGB (3, H, W) in [0, 1]; grey and RGBA are converted to RGB."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"image {path} does not exist")
    Image = _pil()
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def read_mask(path, size=None) -> torch.Tensor:
    """Read a mask image as float32 (1, H, W), 1 where the pixel is missing (any channel > 0.5).

    ``size`` (H, W), when given, is the size the mask must have.
    """
    img = read_image(path)
    mask = (img.amax(0, keepdim=True) > 0.5).float()
    if size is not None and tuple(mask.shape[-2:]) != tuple(size):
        raise InputError(
            f"mask {os.fspath(path)} is {mask.shape[-1]}×{mask.shape[-2]} (W×H) but the image is "
            f"{size[1]}×{size[0]}; the mask must have the image's size"
        )
    return mask


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (1, H, W) float in [0, 1] -> (H, W, 3) or (H, W) uint8, rounded and clamped."""
    if img.dim() != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"to_uint8: image is {tuple(img.shape)}; expected (3, H, W) or (1, H, W)")
    arr = img.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def write_image(img: torch.Tensor, path) -> None:
    """Write (3, H, W) or (1, H, W) in [0, 1] as PNG or JPEG (by suffix), atomically."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in IMAGE_SUFFIXES:
        raise InputError(f"cannot write {path}: the output must end in one of {', '.join(IMAGE_SUFFIXES)}")
    Image = _pil()
    pil = Image.fromarray(to_uint8(img))
    fmt = "PNG" if suffix == ".png" else "JPEG"
    with atomic_write(path) as tmp:
        pil.save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
