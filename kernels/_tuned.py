"""Launch settings and backend choices measured on the user's device, kept between runs.

``attnsr tune`` times the kernels' launch candidates and the fused-versus-``torch`` choice of each
op on the GPU it runs on and writes one JSON file per device and Triton version under the user's
cache directory (``$ATTNSR_CACHE_DIR``, else ``$XDG_CACHE_HOME/attnsr``, else ``~/.cache/attnsr``).
This module reads it: once per device, at the first launch that misses its launch plan, and hands
the launchers a measured setting for their shape class where there is one. Where there is none the
shipped table (``_LAUNCH``, ``_WIN_LAUNCH``) and the shipped backend choice apply.

A *shape class* rounds what a launch's speed depends on to buckets, so that one measurement serves
neighbouring sizes: tokens to a power of two (64 to 65536), head dim to its padded BLOCK_D, batch
× heads (the programs a launch has beside its token blocks) to a power of two up to 64. What
compiles to other code is kept apart: the dtype (bf16, fp16, fp32 as 3×TF32, tf32, exact fp32,
fp64) and the patch size. Keys are strings so the file reads as it is:
``attention/fwd/d64/bf16/p1/n4096/bh8``.

File format (``FORMAT`` = 1): ``{"format": 1, "info": {device, capability, triton, torch, date},
"launch": {key: {"BLOCK_M": ..., "BLOCK_N": ..., "num_warps": ..., "num_stages": ...,
"BLOCK_DC": ..., "SPLIT": ...}}, "backend": {key: "triton" | "torch"}, "rows": [...]}``. A file of
another format, or one that does not parse, is ignored with a warning (the shipped settings apply).
"""

import json
import os
import re
import warnings

import torch

from . import _runtime

FORMAT = 1
_TABLES = {}  # device string ("cuda:0", "cpu") -> the loaded table ({} when there is no file)
_BY_DEVICE = {}  # torch.device -> the same tables, so that a launch builds no string to find its own


def cache_dir() -> str:
    """Where tuned tables live: ``$ATTNSR_CACHE_DIR``, else ``$XDG_CACHE_HOME/attnsr``, else ``~/.cache/attnsr``."""
    if os.environ.get("ATTNSR_CACHE_DIR"):
        return os.environ["ATTNSR_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "attnsr")


def device_slug(device: torch.device) -> str:
    """The file-name part naming a device: GPU name and compute capability, or "cpu" (the
    interpreter, for the tests)."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    return f"{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}-sm{major}{minor}"


def cache_file(device: torch.device) -> str:
    """The tuned table's path for ``device`` and the installed Triton (a new Triton compiles other
    code: its settings are measured again)."""
    import triton

    return os.path.join(cache_dir(), f"tune-{device_slug(device)}-triton{triton.__version__}.json")


def _key(device: torch.device) -> str:
    return f"{device.type}:{device.index or 0}" if device.type == "cuda" else device.type


def table(device: torch.device) -> dict:
    """The tuned table of ``device`` (loaded once; {} when none was written)."""
    found = _BY_DEVICE.get(device)
    if found is None:
        key = _key(device)
        found = _TABLES.get(key)
        if found is None:
            found = _TABLES[key] = _read(cache_file(device))
        _BY_DEVICE[device] = found
    return found


def use(device: torch.device, data) -> None:
    """Make ``data`` the device's table in this process (None: read the file again at the next
    launch); recorded launch plans are dropped. For ``attnsr tune``, which applies what it found."""
    if data is None:
        _TABLES.pop(_key(device), None)
    else:
        _TABLES[_key(device)] = data
    _BY_DEVICE.clear()
    _runtime.SETTINGS_VERSION[0] += 1


def _read(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as why:
        warnings.warn(f"attnsr: ignoring the tuned table {path}: {why}; the shipped settings apply", stacklevel=3)
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        warnings.warn(f"attnsr: ignoring the tuned table {path}: format {data.get('format')!r}, expected "
                      f"{FORMAT}; run `attnsr tune` again", stacklevel=3)
        return {}
    return data


def forget() -> None:
    """Drop the loaded tables (the next launch reads the files again) and every recorded launch plan."""
    _TABLES.clear()
    _BY_DEVICE.clear()
    _runtime.SETTINGS_VERSION[0] += 1


def write(path: str, data: dict) -> None:
    """Write a tuned table atomically: a temporary file in the same folder, then a rename, so that
    a process reading it never sees half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    forget()


# ----------------------------------------------------------------------------------------------
# Shape classes
# ----------------------------------------------------------------------------------------------


def tokens_class(n: int) -> int:
    return min(65536, max(64, _runtime.next_pow2(n)))


def programs_class(batch_heads: int) -> int:
    return min(64, _runtime.next_pow2(max(1, batch_heads)))


def dtype_class(dtype: torch.dtype, precision: str = "ieee") -> str:
    """bf16, fp16, fp32 (3×TF32), tf32, ieee (exact fp32) or fp64: each compiles its own code, so a
    setting measured (and gated) for one is never applied to another."""
    if dtype in (torch.float16, torch.bfloat16):
        return "bf16" if dtype == torch.bfloat16 else "fp16"
    if dtype == torch.float64:
        return "fp64"
    return {"tf32x3": "fp32", "tf32": "tf32", "ieee": "ieee"}[precision]


def attention_key(kernel: str, block_d: int, dtype: torch.dtype, precision: str, patch: int, n: int,
                  batch_heads: int) -> str:
    return (f"attention/{kernel}/d{block_d}/{dtype_class(dtype, precision)}/p{patch}/n{tokens_class(n)}"
            f"/bh{programs_class(batch_heads)}")


def window_key(kernel: str, block_d: int, dtype: torch.dtype, precision: str, tokens: int) -> str:
    return f"window/{kernel}/d{block_d}/{dtype_class(dtype, precision)}/n{tokens}"


def launch_setting(device: torch.device, key):
    """The measured launch settings of ``key`` on ``device`` (a dict), or None. ``key``: the key, or
    a callable building it (only called where the device has a tuned table)."""
    found = table(device)
    if not found:
        return None
    return found.get("launch", {}).get(key() if callable(key) else key)


def backend_choice(device: torch.device, key):
    """The measured backend ("triton" or "torch") of an op's shape class on ``device``, or None."""
    found = table(device)
    return found.get("backend", {}).get(key) if found else None
