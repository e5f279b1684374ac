"""Pixel indices are int32 in the gating kernels; maps may hold up to MAX_PIXELS = 2^31 − 2^16
pixels. The loop bounds the kernels form must stay below 2^31 for every launch at that limit.

No giant tensor is needed: the launch parameters come from the launchers' own functions on meta
tensors (with the GPU settings, not the interpreter's), and the bound arithmetic runs in the
kernels' own @triton.jit helpers inside small probe kernels, whose int32 arithmetic wraps in the
interpreter exactly as on a GPU.
"""

import importlib

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE

from attnsr.kernels._gating import MAX_PIXELS, _chunk_end

gating = importlib.import_module("attnsr.kernels._gating")

INT32_MAX = 2**31 - 1


@triton.jit
def _chunk_probe(OUT, CHUNK, HW, NCH, N: tl.constexpr):
    """For chunks 0 .. NCH − 1 of the channel-gate reductions: [start, end) as the kernels form them."""
    chunk = tl.arange(0, N)
    start = chunk * CHUNK
    end = _chunk_end(start, CHUNK, HW)
    tl.store(OUT + chunk, start, mask=chunk < NCH)
    tl.store(OUT + N + chunk, end, mask=chunk < NCH)


@triton.jit
def _conv_block_probe(OUT, I, ITERS, HW, NPB, N: tl.constexpr, BLOCK_P: tl.constexpr):
    """First pixel of iteration I of programs 0 .. NPB − 1 of the convolution's backward."""
    pid = tl.arange(0, N)
    first = gating._conv_block(pid, I, ITERS, tl.cdiv(HW, BLOCK_P)) * BLOCK_P
    tl.store(OUT + pid, first, mask=pid < NPB)


def _gpu_launch_settings(monkeypatch):
    monkeypatch.setattr(gating, "interpreting", lambda: False)


def _map(batch, channels, hw, channels_last=False):
    """A meta (B, C, 1, H·W) map: shapes and strides only, no memory."""
    x = torch.empty(batch, channels, 1, hw, device="meta")
    return x.to(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("batch, channels", [(1, 1), (1, 16), (2, 64), (1, 3000)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_reduction_chunks_at_the_pixel_limit(batch, channels, channels_last, monkeypatch):
    _gpu_launch_settings(monkeypatch)
    hw = MAX_PIXELS
    x = _map(batch, channels, hw, channels_last)
    _, block_p, chunk, nch, _ = gating.pixel_reduction(x)
    n = triton.next_power_of_2(nch)
    out = torch.zeros(2 * n, dtype=torch.int64, device=DEVICE)
    _chunk_probe[(1,)](out, chunk, hw, nch, N=n)
    start, end = out[:nch].cpu(), out[n:n + nch].cpu()
    assert start[0] == 0 and end[-1] == hw, f"chunks cover [{start[0]}, {end[-1]}), expected [0, {hw})"
    assert torch.equal(start[1:], end[:-1]), "chunks must tile the pixels without gaps or overlaps"
    assert (end > start).all(), f"empty chunks (a wrapped bound) at {(end <= start).nonzero().flatten().tolist()}"
    # the loop over a chunk steps by two tiles of BLOCK_P up to its end: its last index stays in int32
    assert end.max() + 2 * block_p - 1 <= INT32_MAX


# k = 1 (BLOCK_P 4096) with a batch of 3 is a case whose unclamped last block passes 2^31
@pytest.mark.parametrize("batch", [1, 3, 4096])
@pytest.mark.parametrize("k", [1, 3, 15])
def test_convolution_backward_blocks_at_the_pixel_limit(batch, k, monkeypatch):
    _gpu_launch_settings(monkeypatch)
    hw = MAX_PIXELS
    _, block_p, _ = gating._conv_config(k)
    iters, npb = gating.conv_programs(batch, hw, block_p, torch.device("cpu"))
    n_blocks = triton.cdiv(hw, block_p)
    assert npb * iters >= n_blocks, "the programs' iterations must reach every block"
    n = triton.next_power_of_2(npb)
    out = torch.zeros(n, dtype=torch.int64, device=DEVICE)
    for i in sorted({0, 1, iters - 1}):  # the first pixels grow with i: the last iteration is the extreme
        _conv_block_probe[(1,)](out, i, iters, hw, npb, N=n, BLOCK_P=block_p)
        first = out[:npb].cpu()
        assert (first >= 0).all(), f"iteration {i}: negative first pixels (int32 wrap) {first.min().item()}"
        assert first.max() <= n_blocks * block_p, f"iteration {i}: block past the clamp"
        assert first.max() + block_p - 1 <= INT32_MAX
        inside = first < hw
        expect = (torch.arange(npb) * iters + i) * block_p
        assert torch.equal(first[inside], expect[inside]), f"iteration {i}: blocks inside the map moved"
