"""Window suite: Swin shifted-window attention as SwinIR and HAT use it (C = 180, 6 heads: head
dim 30; window 8 (SwinIR) and 16 (HAT), shift = window / 2, Swin's −100 mask), op and block level.

Op level, ``window_attention`` on (B, H, W, C) maps q, k, v split from one (B, H·W, 3C) qkv
projection (SwinIR's layout), with the relative position bias table:
- ``naive``: SwinIR's maths, ``backends.window_attention(backend="naive")`` (roll, partition,
  q·kᵀ + bias + mask, softmax, reverse);
- ``sdpa``: the same partition with SDPA, the bias and mask as its float ``attn_mask``
  (``backend="torch"``);
- ``flex``: ``torch.nn.attention.flex_attention`` on the partitioned windows, a ``score_mod``
  adding the bias gathered from the table and the mask, compiled with ``torch.compile`` (on CPU
  forward only: FlexAttention has no backward there);
- ``attnsr``: the fused Triton kernel reading q, k, v in place (on CPU in Triton's interpreter in a
  subprocess, a test tool: peak memory only, at 32², where the interpreted fwd+bwd takes ≈ 1.5 min
  at window 16 on 2 cores).

Block level, forward + backward of one block as a training step runs it (input and every
parameter get gradients), HAT's ``HAB`` and SwinIR's ``SwinTransformerBlock``:
- ``naive``: the published block (HAT's HAB from spandrel when spandrel is installed, else the
  copies below, whose attention is ``backends.window_attention(backend="naive")``);
- ``sdpa``, ``attnsr``: that block after ``attnsr.swap_attention(block, backend="torch" /
  "triton")`` (HybridAttentionBlock / SwinBlock on the un-partitioned map; the HAB's channel
  attention becomes attnsr's too).
On CPU the ``attnsr`` block runs in Triton's interpreter in a subprocess: peak memory only (the
harness's ``interpret`` cases), on a map small enough for the interpreter (≈ 2 min a step at 32²,
window 16, on 2 cores).

FLOPs count the attention only: 4·B·H·W·N·C forward (N = window², every token attends to its
window), 3.5× with backward (the backward counted as 2.5× the forward, as FlashAttention does).
"""

import importlib.util
import inspect

import torch
from torch import nn

from benchmarks.harness import FWD_BWD_FLOPS, Bench, Skip

CHANNELS, HEADS = 180, 6  # SwinIR's and HAT's embedding: head dim 30
WINDOWS = (8, 16)
GPU_TOKENS = 65536  # tokens per call on a GPU: batch 16 at 64², 4 at 128²
CPU_OP_SIZE = 32  # the interpreted fused op's memory: 64² takes ≈ 6.5 min a fwd+bwd at window 16
CPU_BLOCK_SIZE = 32  # the interpreted fused step takes minutes on larger maps
HEADLINE_BLOCK = ("HAB", 16)  # the figure the project needs: HAT's training-step memory, window 16


def _batch(size: int, device: torch.device) -> int:
    return 1 if device.type == "cpu" else max(1, GPU_TOKENS // (size * size))


def _case(op, mode, dtype, batch, size, window, provider, device):
    shape = f"{batch}x{CHANNELS}x{size}x{size} h{HEADS} w{window} s{window // 2}"
    name = op if op == "window_attention" else f"{op} block"
    case = {"suite": "window", "op": op, "provider": provider, "mode": mode, "dtype": dtype, "shape": shape,
            "group": f"{name} {mode} {dtype} {shape}", "batch": batch, "size": size, "window": window}
    if provider == "attnsr" and device.type == "cpu":
        case["interpret"] = True
    return case


def cases(device: torch.device, quick: bool = False) -> list:
    gpu = device.type == "cuda"
    dtypes = ["float32", "bfloat16"] if gpu else ["float32"]
    if quick:
        dtypes = dtypes[-1:]
    out = []
    op_sizes = (64, 128) if gpu else (CPU_OP_SIZE,)
    op_windows = WINDOWS
    if quick:  # on CPU as the quick block below: 16², window 8, the interpreted op in seconds
        op_sizes, op_windows = ((64,), WINDOWS[-1:]) if gpu else ((16,), WINDOWS[:1])
    for dtype in dtypes:
        for mode in ("fwd+bwd",) if quick else ("fwd", "fwd+bwd"):
            for size in op_sizes:
                for window in op_windows:
                    for provider in ("naive", "sdpa", "flex", "attnsr"):
                        out.append(_case("window_attention", mode, dtype, _batch(size, device), size, window,
                                         provider, device))
    if gpu:
        blocks = [(op, 64, w) for op in ("HAB", "SwinBlock") for w in WINDOWS]
    else:  # SwinIR's window on the SwinIR block, HAT's on the HAB: the interpreted step is slow
        blocks = [("HAB", CPU_BLOCK_SIZE, 16), ("SwinBlock", CPU_BLOCK_SIZE, 8)]
    if quick:  # one small HAB: 16² with window 8 keeps the interpreted step to seconds on CPU
        blocks = [("HAB", 64, 16)] if gpu else [("HAB", 16, 8)]
    for dtype in dtypes:
        for op, size, window in blocks:
            for provider in ("naive", "sdpa", "attnsr"):
                out.append(_case(op, "fwd+bwd", dtype, _batch(size, device), size, window, provider, device))
    return out


def headline(case: dict) -> bool:
    """Behind the targets: the HAB training step at window 16 (its peak memory, fused vs naive)."""
    return (case["op"], case["window"]) == HEADLINE_BLOCK


def flops(case: dict) -> float:
    b, s, n = case["batch"], case["size"], case["window"] ** 2
    return 4.0 * b * s * s * n * CHANNELS * (FWD_BWD_FLOPS if case["mode"] == "fwd+bwd" else 1.0)


# ----------------------------------------------------------------------------------------------
# Op level
# ----------------------------------------------------------------------------------------------


def _flex(window: int, shift: int, table, mask, scale: float):
    """Window attention through flex_attention: a score_mod gathering the bias from ``table`` by
    Swin's relative position index and adding the (nW, N, N) ``mask`` of each window; compiled."""
    from torch.nn.attention.flex_attention import flex_attention

    from attnsr.kernels.reference import relative_position_index, window_partition, window_reverse

    index = relative_position_index((window, window)).to(table.device)
    windows = mask.shape[0]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[index[q_idx, kv_idx], h] + mask[b % windows, q_idx, kv_idx]

    torch._dynamo.reset()  # a fresh, static-shape compile per case (see gating.py)
    attend = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        _, h, w, _ = q.shape
        heads = table.shape[1]
        out = attend(*(window_partition(t, window, shift, heads) for t in (q, k, v)), score_mod=score_mod,
                     scale=scale)
        return window_reverse(out, h, w, window, shift)

    return run


def _build_op(case: dict, device: torch.device) -> Bench:
    from attnsr import backends
    from attnsr.kernels.reference import swin_shift_mask

    dtype = getattr(torch, case["dtype"])
    provider, backward = case["provider"], case["mode"] == "fwd+bwd"
    b, s, window = case["batch"], case["size"], case["window"]
    shift = window // 2
    gen = torch.Generator(device).manual_seed(0)
    qkv = torch.randn(b, s * s, 3 * CHANNELS, device=device, dtype=dtype, generator=gen).requires_grad_(backward)
    # the table stays fp32 (a model's parameter under autocast), with a gradient like the model's
    table = (torch.randn((2 * window - 1) ** 2, HEADS, device=device, generator=gen) * 0.02).requires_grad_(backward)
    grad = torch.randn(b, s, s, CHANNELS, device=device, dtype=dtype, generator=gen)
    scale = (CHANNELS // HEADS) ** -0.5
    if provider == "flex":
        mask = swin_shift_mask(s, s, (window, window), (shift, shift), dtype=torch.float32, device=device)
        attend = _flex(window, shift, table, mask, scale)
    else:
        backend = {"naive": "naive", "sdpa": "torch", "attnsr": "triton"}[provider]

        def attend(q, k, v):
            return backends.window_attention(q, k, v, window_size=window, shift_size=shift, heads=HEADS,
                                             bias_table=table, scale=scale, backend=backend)

    def run():
        q, k, v = qkv.view(b, s, s, 3 * CHANNELS).split(CHANNELS, dim=-1)
        if not backward:
            with torch.no_grad():
                attend(q, k, v)
            return
        qkv.grad = table.grad = None
        attend(q, k, v).backward(grad)

    return Bench(run, flops=flops(case))


# ----------------------------------------------------------------------------------------------
# Block level: the published blocks (HAT's HAB, SwinIR's SwinTransformerBlock), written out with
# their parameters, children and forward as published; the attention maths is attnsr's naive
# backend (SwinIR's maths as written: q·scale·kᵀ + bias + mask, softmax, ·v).
# ----------------------------------------------------------------------------------------------


class _WindowAttention(nn.Module):
    """SwinIR's / HAT's WindowAttention: forward(x, mask=None) on windows (nW·B, N, C)."""

    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, (window_size, window_size), num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def attend(self, x, mask):
        from attnsr import backends

        b_, n, c = x.shape
        q, k, v = self.qkv(x).view(b_, *self.window_size, 3 * c).split(c, dim=-1)
        out = backends.window_attention(q, k, v, window_size=self.window_size, heads=self.num_heads,
                                        bias_table=self.relative_position_bias_table, mask=mask, scale=self.scale,
                                        backend="naive")
        return self.proj_drop(self.proj(out.reshape(b_, n, c)))

    def forward(self, x, mask=None):
        return self.attend(x, mask)


class _WindowAttentionRPI(_WindowAttention):
    """HAT's WindowAttention: forward(x, rpi, mask=None), Swin's index passed in by the model."""

    def forward(self, x, rpi, mask=None):
        return self.attend(x, mask)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class _ChannelAttention(nn.Module):
    """HAT's (RCAN's) channel attention: x · sigmoid(conv(relu(conv(avgpool x))))."""

    def __init__(self, dim: int, squeeze: int):
        super().__init__()
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, dim // squeeze, 1),
                                       nn.ReLU(inplace=True), nn.Conv2d(dim // squeeze, dim, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.attention(x)


class _CAB(nn.Module):
    """HAT's channel attention block: conv 3×3 C → C/3, GELU, conv 3×3 C/3 → C, channel attention."""

    def __init__(self, dim: int, compress: int = 3, squeeze: int = 30):
        super().__init__()
        self.cab = nn.Sequential(nn.Conv2d(dim, dim // compress, 3, 1, 1), nn.GELU(),
                                 nn.Conv2d(dim // compress, dim, 3, 1, 1), _ChannelAttention(dim, squeeze))

    def forward(self, x):
        return self.cab(x)


class _SwinTransformerBlock(nn.Module):
    """SwinIR's SwinTransformerBlock: forward(x (B, H·W, C), x_size); mlp ratio 2 (SwinIR's SR models)."""

    def __init__(self, dim: int, input_resolution, num_heads: int, window_size: int, shift_size: int,
                 mlp_ratio: float = 2.0):
        super().__init__()
        self.input_resolution, self.window_size, self.shift_size = tuple(input_resolution), window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = self._attention(dim, window_size, num_heads)
        self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def _attention(self, dim, window_size, num_heads):
        return _WindowAttention(dim, window_size, num_heads)

    def windowed(self, x, x_size, attend):
        """Shift, partition, attend (windows (nW·B, N, C) -> same), reverse, shift back."""
        from attnsr.kernels.reference import window_partition, window_reverse

        h, w = x_size
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        if self.shift_size:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        # windows (nW·B, N, C), the published window_partition / window_reverse
        x = window_reverse(attend(window_partition(x, self.window_size)[:, 0])[:, None], h, w, self.window_size)
        if self.shift_size:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        return x.view(b, h * w, c)

    def forward(self, x, x_size):
        from attnsr.kernels.reference import swin_shift_mask

        mask = None
        if self.shift_size:  # SwinIR's calculate_mask
            mask = swin_shift_mask(*x_size, self.window_size, self.shift_size, dtype=x.dtype, device=x.device)
        x = x + self.drop_path(self.windowed(self.norm1(x), x_size, lambda w: self.attn(w, mask=mask)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _HAB(_SwinTransformerBlock):
    """HAT's HAB: x + attention(norm1 x) + 0.01 · CAB(norm1 x), then the MLP; forward(x, x_size,
    rpi_sa, attn_mask)."""

    def __init__(self, dim: int, input_resolution, num_heads: int, window_size: int, shift_size: int,
                 mlp_ratio: float = 2.0, compress_ratio: int = 3, squeeze_factor: int = 30, conv_scale: float = 0.01):
        super().__init__(dim, input_resolution, num_heads, window_size, shift_size, mlp_ratio)
        self.conv_scale = conv_scale
        self.conv_block = _CAB(dim, compress_ratio, squeeze_factor)

    def _attention(self, dim, window_size, num_heads):
        return _WindowAttentionRPI(dim, window_size, num_heads)

    def forward(self, x, x_size, rpi_sa, attn_mask):
        h, w = x_size
        b, _, c = x.shape
        y = self.norm1(x)
        conv = self.conv_block(y.view(b, h, w, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, h * w, c)
        mask = attn_mask if self.shift_size else None
        a = self.windowed(y, x_size, lambda win: self.attn(win, rpi_sa, mask=mask))
        x = x + self.drop_path(a) + conv * self.conv_scale
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _naive_block(op: str, size: int, window: int) -> nn.Module:
    """The published block: spandrel's HAB when spandrel is installed, else the copies above."""
    kwargs = dict(dim=CHANNELS, input_resolution=(size, size), num_heads=HEADS, window_size=window,
                  shift_size=window // 2, mlp_ratio=2.0)
    if op == "HAB" and importlib.util.find_spec("spandrel") is not None:
        from spandrel.architectures.HAT import HAT

        return inspect.getmodule(HAT).HAB(**kwargs)
    return (_HAB if op == "HAB" else _SwinTransformerBlock)(**kwargs)


def _build_block(case: dict, device: torch.device) -> Bench:
    import attnsr
    from attnsr.kernels.reference import swin_shift_mask

    dtype = getattr(torch, case["dtype"])
    b, s, window, provider = case["batch"], case["size"], case["window"], case["provider"]
    torch.manual_seed(0)
    holder = nn.Sequential(_naive_block(case["op"], s, window))
    if provider != "naive":
        attnsr.swap_attention(holder, backend={"sdpa": "torch", "attnsr": "triton"}[provider])
        if type(holder[0]).__name__ not in ("HybridAttentionBlock", "SwinBlock"):
            raise RuntimeError(f"swap_attention left the {case['op']} block as it was: {holder.attnsr_left}")
    block = holder[0].to(device)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(b, s * s, CHANNELS, device=device, generator=gen, requires_grad=True)
    grad = torch.randn(b, s * s, CHANNELS, device=device, generator=gen)
    args = ((s, s),)
    if case["op"] == "HAB":
        from attnsr.windows import standard_index

        shift = window // 2
        args += (standard_index(window, device), swin_shift_mask(s, s, window, shift, device=device))
    autocast = device.type == "cuda" and dtype != torch.float32

    def step():
        x.grad = None
        block.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            out = block(x, *args)
        out.float().backward(grad)

    return Bench(step, flops=flops(case))


def build(case: dict, device: torch.device) -> Bench:
    from attnsr.kernels._runtime import interpreting

    provider = case["provider"]
    if device.type == "cpu" and provider == "flex" and case["mode"] != "fwd":
        raise Skip("FlexAttention has no backward on CPU")
    if device.type == "cpu" and provider == "attnsr" and not (case.get("interpret") and interpreting()):
        if case.get("interpret"):
            raise Skip("memory only, in Triton's interpreter: measured by benchmarks.report in a subprocess")
        raise Skip("Triton kernels need a GPU (on CPU they run in Triton's interpreter, a test tool)")
    if case["op"] == "window_attention":
        return _build_op(case, device)
    return _build_block(case, device)
