"""Helpers shared by the gating and layer-fusion tests: inputs, the float64 comparison, pass counting."""

import torch
from conftest import DEVICE
from tolerances import assert_close_rel


def draw(*shape):
    """Standard normal float64 numbers drawn on the CPU and moved to the test device: the same
    numbers on every device (CUDA's generator draws others, and the inputs were chosen on the CPU,
    where CI runs: with CUDA's draws a 2-unit MLP can have both ReLUs dead and no gradient to check)."""
    return torch.randn(*shape, dtype=torch.float64).to(DEVICE)


def leaf(shape, dtype, *, scale=1.0, shift=0.0, channels_last=False):
    """A fresh random leaf tensor that requires grad (drawn in float64, rounded to ``dtype``)."""
    t = (draw(shape) * scale + shift).to(dtype)
    if channels_last:
        t = t.to(memory_format=torch.channels_last)
    return t.requires_grad_()


def feature_map(shape, dtype, *, channels_last=False):
    """x: (B, C, H, W) with a random offset per (b, c), so pooled statistics differ between channels."""
    b, c = shape[:2]
    offset = draw(b, c, 1, 1)
    x = draw(shape) + offset
    x = x.to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_()


def mlp_weights(channels, hidden, dtype, *, biases=True):
    """w1 (hidden, C), b1, w2 (C, hidden), b2 scaled so that the gate stays away from 0 and 1 and
    the ReLU is alive for most units (so every weight has a gradient worth checking)."""
    w1 = leaf((hidden, channels), dtype, scale=channels**-0.5)
    w2 = leaf((channels, hidden), dtype, scale=hidden**-0.5)
    if not biases:
        return w1, None, w2, None
    b1 = leaf((hidden,), dtype, scale=0.2, shift=0.5)
    b2 = leaf((channels,), dtype, scale=0.5)
    return w1, b1, w2, b2


def conv_weights(kernel_size, dtype, *, bias=True):
    """sweight (1, 2, k, k), sbias (1,) or None, scaled to keep the spatial gate away from 0 and 1."""
    w = leaf((1, 2, kernel_size, kernel_size), dtype, scale=0.7 / kernel_size)
    return w, (leaf((1,), dtype, scale=0.3) if bias else None)


def check_op(fn, ref, inputs, dtype, what, *, grad=None, tol=None):
    """fn(*inputs) against ref(*float64 copies of inputs): the output and the gradient of every
    input that requires grad, with the same upstream gradient (drawn in ``dtype``).

    ``inputs`` is a flat list; None entries pass through. Returns (output, gradients)."""
    out = fn(*inputs)
    ref_inputs = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    expect = ref(*ref_inputs)
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}, expected {dtype}"
    assert_close_rel(out, expect, dtype, f"{what}: output", tol)
    if grad is None:
        grad = draw(out.shape).to(dtype)
    idx = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    got = torch.autograd.grad(out, [inputs[i] for i in idx], grad)
    want = torch.autograd.grad(expect, [ref_inputs[i] for i in idx], grad.double())
    for i, g, w in zip(idx, got, want):
        assert w.norm() > 0, f"{what}: the reference gradient of input {i} is zero; the check would say nothing"
        assert g.dtype == inputs[i].dtype, f"{what}: grad of input {i} has dtype {g.dtype}"
        assert_close_rel(g, w, dtype, f"{what}: grad of input {i} {tuple(inputs[i].shape)}", tol)
    return out, got


class LaunchLog:
    """Records, for every Triton kernel launch, which tensors of a set of watched ones it was given.

    ``watch(name, t)`` names a map-sized tensor by its storage; ``count(name)`` is the number of
    launches that received it: the passes over it (each kernel touches each tile of its map once).
    """

    def __init__(self, monkeypatch, modules):
        self.launches = []
        self.watched = {}
        for module in modules:
            for attr in dir(module):
                obj = getattr(module, attr)
                if attr.startswith("_") and attr.endswith("_kernel") and hasattr(obj, "run"):
                    # in the instance's __dict__: undone by deleting it, so no bound method stays
                    # behind to shadow the class's run for later tests (tests/test_gating_launches.py)
                    monkeypatch.setitem(obj.__dict__, "run", self._wrap(attr, obj.run))

    def _wrap(self, name, run):
        def tensors(values):
            for v in values:
                if isinstance(v, torch.Tensor):
                    yield v
                elif isinstance(v, tuple):  # a tuple argument (layer_fusion's maps)
                    yield from tensors(v)

        def logged(*args, **kwargs):
            ptrs = {a.data_ptr() for a in tensors(list(args) + list(kwargs.values()))}
            self.launches.append((name, ptrs))
            return run(*args, **kwargs)

        return logged

    def watch(self, name, t):
        self.watched[name] = t.data_ptr()

    def count(self, name):
        return sum(self.watched[name] in ptrs for _, ptrs in self.launches)

    def clear(self):
        self.launches.clear()


def check_pass_counts(log: LaunchLog, fn, x, *, forward, backward):
    """Run y = fn(x) and dx, counting the launches that touch each map-sized tensor.

    forward = (reads of x, writes of y); backward = (reads of dy, reads of x, writes of dx). Also
    checks that the only map-sized tensor saved for backward is x itself.
    """
    y = fn(x)
    log.watch("x", x)
    log.watch("y", y)
    assert (log.count("x"), log.count("y")) == forward, "forward passes over (x, y)"
    big = [t for t in y.grad_fn.saved_tensors if t is not None and t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), "backward must keep x and no other map"
    log.clear()
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    log.watch("dy", dy)
    log.watch("dx", dx)
    assert (log.count("dy"), log.count("x"), log.count("dx")) == backward, "backward passes over (dy, x, dx)"


def assert_same_nonfinite(out, ref, dtype, what):
    """NaN, +inf and -inf exactly where the reference has them; the finite rest within tolerance."""
    out, ref = out.detach().double(), ref.detach().double()
    for name, where in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        a, b = where(out), where(ref)
        if not torch.equal(a, b):
            first = (a != b).nonzero()[0].tolist()
            raise AssertionError(f"{what}: {name} at {int(a.sum())} places, the reference at {int(b.sum())}; "
                                 f"first difference at {first}")
    finite = torch.isfinite(ref)
    if finite.any():
        assert_close_rel(out[finite], ref[finite], dtype, f"{what} (finite elements)")


def assert_max_matches_torch(mx, arg, x, dim, what):
    """A kernel's max statistic and arg-max index against torch.amax / torch.argmax over ``dim``:
    NaN is the max, the first NaN its index (torch's rule)."""
    want_max, want_arg = x.amax(dim), x.argmax(dim)
    arg = arg.long().reshape(want_arg.shape)
    bad = (arg != want_arg).nonzero()
    if bad.numel():
        first = tuple(bad[0].tolist())
        raise AssertionError(f"{what}: arg-max differs from torch.argmax at {len(bad)} places, first {first}: "
                             f"got {arg[first]}, expected {want_arg[first]}")
    mx = mx.reshape(want_max.shape).to(want_max.dtype)
    assert torch.equal(mx.isnan(), want_max.isnan()), f"{what}: NaN maxima differ from torch.amax"
    assert torch.equal(mx.nan_to_num(), want_max.nan_to_num()), f"{what}: maxima differ from torch.amax"
