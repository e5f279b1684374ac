"""Launch budgets of the gating ops (issue 24): Triton launches plus ATen compute ops per call.

What is counted, per call of an op (forward: the public function; forward+backward: the public
function and ``torch.autograd.grad`` of its output with a given upstream gradient, so the autograd
engine accumulates nothing):
  - Triton launches: ``kernel[grid](...)`` calls of a ``@triton.jit`` kernel, in Triton's
    interpreter (CPU CI) as on a GPU: the test wraps ``KernelInterface.__getitem__``, the base of
    ``JITFunction`` and ``InterpretedFunction`` (``attnsr.kernels._runtime.recorded_launches``
    sees only launches that reach a compiled kernel's launcher, which the interpreter never does).
    Calls of ``@triton.jit`` helpers inside a kernel are not launches and are not counted.
  - ATen compute ops: ``torch.profiler`` CPU events named ``aten::*`` that are not nested inside
    another ``aten::*`` event (a composite op counts once, not with the ops it calls) nor inside a
    counted launch (the interpreter moves a kernel's tensors with ATen ops: the kernel's own work),
    except the allocations and views in ``NOT_COMPUTE`` (they launch nothing and touch no data).
The call is made once before counting (compiled kernels, cached buffers and call plans exist),
then counted on its second run.

Budgets (issue 24, point 1): channel gate forward ≤ 2, forward+backward ≤ 5; spatial gate ≤ 2 / ≤ 5;
CBAM ≤ 3 / ≤ 8; layer fusion ≤ 1 / ≤ 2. The same calls written in eager PyTorch
(kernels/reference.py) are counted beside them and printed (``pytest -s``) for the record.
"""

import contextlib

import pytest
import torch
import triton
from conftest import DEVICE
from gating_checks import conv_weights, feature_map, mlp_weights

from attnsr.kernels import cbam_gate, channel_gate, layer_fusion, reference, spatial_gate

LAUNCH = "triton launch: "  # the profiler range around each counted launch
NOT_COMPUTE = frozenset(
    f"aten::{name}"
    for name in (
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",  # allocations
        "view", "_unsafe_view", "as_strided", "detach", "alias", "lift_fresh", "_reshape_alias",  # views
        "t", "transpose", "permute", "expand", "squeeze", "unsqueeze", "select", "slice", "split",
        "reshape", "flatten", "resolve_conj", "resolve_neg",
    )
)


@contextlib.contextmanager
def counting_launches():
    """Inside the block, the list yielded collects the names of the Triton kernels launched.

    A launch is ``kernel[grid](...)``: ``KernelInterface.__getitem__``, the base of the JIT's and the
    interpreter's kernels (Python looks dunders up on the class, so an instance attribute ``run``
    left by a monkeypatch elsewhere cannot hide a launch)."""
    launched = []
    interface = triton.runtime.jit.KernelInterface
    original = interface.__dict__["__getitem__"]

    def getitem(self, grid):
        launch = original(self, grid)
        name = getattr(self, "__name__", None) or self.fn.__name__

        def counted(*args, **kwargs):
            launched.append(name)
            with torch.profiler.record_function(f"{LAUNCH}{name}"):
                return launch(*args, **kwargs)

        return counted

    interface.__getitem__ = getitem
    try:
        yield launched
    finally:
        interface.__getitem__ = original


def top_level_aten_ops(prof) -> list:
    """Names of the profiler's aten:: events not nested in another aten:: event or in a launch,
    less NOT_COMPUTE."""
    events = sorted(
        (e for e in prof.events() if e.name.startswith(("aten::", LAUNCH))),
        key=lambda e: (e.time_range.start, -e.time_range.end),
    )
    top, open_end = [], None
    for e in events:
        if open_end is not None and e.time_range.end <= open_end and e.thread == top[-1].thread:
            continue  # inside the last top-level aten event
        top.append(e)
        open_end = e.time_range.end
    return [e.name for e in top if e.name.startswith("aten::") and e.name not in NOT_COMPUTE]


def count(call):
    """(Triton launches, ATen compute ops) of ``call()``, after one warm-up call."""
    call()
    with counting_launches() as launched:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            call()
    return launched, top_level_aten_ops(prof)


def _grad_call(fn, inputs, dy):
    wanted = [t for t in inputs if t is not None and t.requires_grad]

    def call():
        return torch.autograd.grad(fn(*inputs), wanted, dy)

    return call


def _cases():
    """(name, fused function, eager reference, inputs, forward budget, forward+backward budget)."""
    dt = torch.float32
    x = feature_map((2, 16, 9, 11), dt)
    w1, b1, w2, b2 = mlp_weights(16, 4, dt)
    sw, sb = conv_weights(7, dt)
    maps = [feature_map((2, 16, 9, 11), dt) for _ in range(3)]
    lw = torch.softmax(torch.randn(2, 3, dtype=dt, device=DEVICE), 1).requires_grad_()
    return [
        ("channel_gate avg", lambda *a: channel_gate(*a, pool="avg"),
         lambda *a: reference.channel_gate_ref(*a, pool="avg"), [x, w1, b1, w2, b2], 2, 5),
        ("channel_gate avgmax", lambda *a: channel_gate(*a, pool="avgmax"),
         lambda *a: reference.channel_gate_ref(*a, pool="avgmax"), [x, w1, b1, w2, b2], 2, 5),
        ("spatial_gate", spatial_gate, reference.spatial_gate_ref, [x, sw, sb], 2, 5),
        ("cbam_gate", lambda *a: cbam_gate(*a, pool="avgmax"),
         lambda *a: reference.cbam_gate_ref(*a, pool="avgmax"), [x, w1, b1, w2, b2, sw, sb], 3, 8),
        ("layer_fusion", lambda *a: layer_fusion(list(a[:3]), a[3]),
         lambda *a: reference.layer_fusion_ref(list(a[:3]), a[3]), [*maps, lw], 1, 2),
    ]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_launch_budget(case):
    name, fused, eager, inputs, fwd_budget, total_budget = case
    dy = torch.randn_like(fused(*inputs))
    rows = []
    for label, fn in (("fused", fused), ("eager", eager)):
        with torch.no_grad():
            fwd = count(lambda fn=fn: fn(*inputs))
        total = count(_grad_call(fn, inputs, dy))
        rows.append((label, fwd, total))
        print(f"{name:20s} {label}: forward {len(fwd[0])} launches + {len(fwd[1])} ATen ops {fwd[1]}; "
              f"forward+backward {len(total[0])} + {len(total[1])} {total[0]} {total[1]}")
    _, (launches, ops), (all_launches, all_ops) = rows[0]
    assert len(launches) + len(ops) <= fwd_budget, (
        f"{name} forward: {len(launches)} launches {launches} + {len(ops)} ATen ops {ops}; budget {fwd_budget}")
    assert len(all_launches) + len(all_ops) <= total_budget, (
        f"{name} forward+backward: {len(all_launches)} launches {all_launches} + {len(all_ops)} ATen ops "
        f"{all_ops}; budget {total_budget}")
