"""Shared plumbing for the kernel launchers: interpreter detection and input validation.

Nothing here launches a kernel. Every public op validates its inputs with these helpers so that
errors read the same everywhere: ``<op>: <what was given>; <what was expected>``.
"""

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_tensor(op: str, name: str, t) -> None:
    """``t`` must be a floating-point tensor of a dtype the kernels support."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64"
        )


def check_rank(op: str, name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(
            f"{op}: {name} has {t.dim()} dims, shape {tuple(t.shape)}; expected {rank} dims {layout}"
        )


def check_same(op: str, tensors: dict) -> torch.Tensor:
    """All tensors share dtype and device; returns the first one. ``tensors`` maps name -> tensor."""
    names = list(tensors)
    first = tensors[names[0]]
    for n in names[1:]:
        t = tensors[n]
        if t.dtype != first.dtype:
            raise TypeError(
                f"{op}: {names[0]} is {first.dtype} but {n} is {t.dtype}; all inputs must share one dtype"
            )
        if t.device != first.device:
            raise ValueError(
                f"{op}: {names[0]} is on {first.device} but {n} is on {t.device}; "
                "all inputs must be on one device"
            )
    return first


def check_runnable(op: str, device: torch.device) -> None:
    """Triton kernels need a GPU, or CPU tensors with the interpreter switched on."""
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            f"{op}: got CPU tensors but Triton kernels need a GPU. Set TRITON_INTERPRET=1 before "
            "importing triton to run them on CPU with Triton's interpreter (slow, for testing), or use "
            "backend='torch' in the attnsr layers."
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"{op}: tensors on {device} are not supported; expected CUDA (or CPU with TRITON_INTERPRET=1)"
        )


def tf32_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for fp32 operands: tf32 when torch allows it for CUDA matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
