"""The host path of the attention ops: one gradient buffer for a fused qkv projection, checks skipped
for a call seen before (and only then), launch plans recorded once and replayed.

The launch plans only exist where kernels reach a compiled kernel's launcher, which the interpreter
never does: those tests run ``benchmarks.host`` in a child process without TRITON_INTERPRET, where
each launch is bound for an sm_90 target and not run (as the host-cost benchmark does)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from attnsr.kernels import flash_attention, image_attention, window_attention
from attnsr.kernels._runtime import fused_base
from attnsr.kernels.reference import image_attention_ref
from conftest import DEVICE, ON_GPU
from tolerances import assert_close_rel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _split_views():
    """(name, base, (q, k, v)) for the ways one qkv projection is split in three."""
    b, c, h, w = 2, 6, 3, 5
    nchw = torch.randn(b, 3 * c, h, w, requires_grad=True)
    channels_last = torch.randn(b, 3 * c, h, w).to(memory_format=torch.channels_last).requires_grad_()
    swinir = torch.randn(b, h * w, 3 * c, requires_grad=True)
    timm = torch.randn(b, h * w, 3 * c, requires_grad=True)  # reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)
    return [
        ("nchw split", nchw, nchw.split(c, 1)),
        ("channels_last split", channels_last, channels_last.split(c, 1)),
        ("swinir view split", swinir, swinir.view(b, h, w, 3 * c).split(c, -1)),
        ("timm unbind", timm, timm.reshape(b, h * w, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)),
    ]


@pytest.mark.parametrize("index", range(4), ids=[v[0] for v in _split_views()])
def test_fused_base_recognises_a_split_projection(index):
    _, base, (q, k, v) = _split_views()[index]
    assert fused_base(q, k, v) is base


def test_fused_base_refuses_what_does_not_tile_one_tensor():
    x = torch.randn(2, 24, 4, 4, requires_grad=True)
    q, k, v, _ = x.split(6, 1)  # a fourth part: q, k, v do not cover x
    assert fused_base(q, k, v) is None
    a, b, c = torch.randn(3, 2, 6, 4, 4, requires_grad=True).unbind(0)
    assert fused_base(a, b, c) is not None  # stacked on a leading axis: one buffer too
    assert fused_base(a, a, a) is None  # the same view three times
    y = torch.randn(2, 18, 4, 4)  # no gradient wanted
    assert fused_base(*y.split(6, 1)) is None
    z = torch.randn(2, 18, 4, 4, requires_grad=True)
    assert fused_base(*z.split(6, 1)[::-1]) is None  # out of order: q is not first in memory
    assert fused_base(*(t.clone() for t in z.split(6, 1))) is None  # copies, not views


def test_the_backward_writes_one_gradient_for_the_fused_map():
    """No SplitBackward between the op and the projection: the gradient goes to it whole, and it
    equals the float64 reference's, also where q is used elsewhere too."""
    qkv = torch.randn(2, 48, 5, 7, device=DEVICE, requires_grad=True)
    q, k, v = qkv.split(16, 1)
    out = image_attention(q, k, v, heads=2)
    names = {type(fn).__name__ for fn, _ in out.grad_fn.next_functions if fn is not None}
    assert names == {"AccumulateGrad"}, names
    loss = out.square().sum() + 3 * q.sum()
    ref_q, ref_k, ref_v = qkv.double().split(16, 1)
    ref = image_attention_ref(ref_q, ref_k, ref_v, heads=2)
    ref_loss = ref.square().sum() + 3 * ref_q.sum()
    (got,) = torch.autograd.grad(loss, qkv)
    (want,) = torch.autograd.grad(ref_loss, qkv)
    assert_close_rel(got, want, torch.float32, "dqkv through the fused buffer and q's other use")


def test_double_backward_through_the_fused_buffer_raises():
    qkv = torch.randn(1, 12, 3, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(image_attention(*qkv.split(4, 1)).sum(), qkv, create_graph=True)
    with pytest.raises(RuntimeError, match=r"image_attention does not support double backward"):
        g.sum().backward()


def test_a_call_seen_before_is_still_checked_where_it_differs():
    q = torch.randn(1, 8, 4, 4, device=DEVICE)
    image_attention(q, q, q, heads=2)
    image_attention(q, q, q, heads=2)  # the same signature: its checks are skipped
    with pytest.raises(ValueError, match=r"heads = 3 does not divide C = 8"):
        image_attention(q, q, q, heads=3)
    with pytest.raises(ValueError, match=r"q is \(1, 8, 4, 4\) but k is \(1, 8, 4, 2\)"):
        image_attention(q, q[..., :2], q, heads=2)
    s = torch.randn(1, 2, 5, 4, device=DEVICE)
    flash_attention(s, s, s)
    with pytest.raises(ValueError, match=r"k is \(1, 2, 5, 4\) but v is \(1, 2, 3, 4\)"):
        flash_attention(s, s, s[:, :, :3])


@pytest.mark.skipif(ON_GPU, reason="the interpreter's bf16 dot rule is what is checked; on a GPU autocast runs bf16")
def test_autocast_calls_are_checked_in_full():
    q = torch.randn(1, 8, 4, 4, device=DEVICE)
    image_attention(q, q, q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert image_attention(q, q, q).dtype == torch.bfloat16


def test_window_mask_and_table_arguments_are_part_of_the_signature():
    q = torch.randn(1, 8, 8, 8, device=DEVICE)
    table = torch.randn(49, 2, device=DEVICE)
    window_attention(q, q, q, window_size=4, heads=2, bias_table=table)
    with pytest.raises(ValueError, match=r"bias_table is \(48, 2\); expected \(49, 2\)"):
        window_attention(q, q, q, window_size=4, heads=2, bias_table=table[:48])
    with pytest.raises(ValueError, match=r"mask is \(3, 16, 16\)"):
        window_attention(q, q, q, window_size=4, heads=2, mask=torch.zeros(3, 16, 16, device=DEVICE))


_PLAN_SCRIPT = r"""
import json, torch
from benchmarks import host
from attnsr.kernels import image_attention
from attnsr.kernels import attention as _  # noqa
import importlib
attn = importlib.import_module("attnsr.kernels.attention")
report = {}
with host.launches_bound_not_run():
    qkv = torch.randn(1, 96, 8, 8, requires_grad=True)
    def step(x):
        return host._launches(lambda: image_attention(*x.split(32, 1)).sum().backward())
    report["launches"] = [step(qkv), step(qkv)]
    call = next(iter(attn._CALLS.seen.values()))
    report["plans_after_two"] = len(call.plans)
    step(qkv)
    report["plans_after_three"] = len(call.plans)
    # q, k, v 4 bytes off 16-byte alignment: another specialisation, another plan
    big = torch.randn(1, 96 * 64 + 1, requires_grad=True)
    odd = big[:, 1:].view(1, 96, 8, 8)
    report["odd_launches"] = step(odd)
    report["plans_with_odd"] = len(call.plans)
    with attn._launch_override("fwd", BLOCK_M=16):  # new settings: recorded again
        step(qkv)
    report["plans_after_override"] = len(call.plans)
print("REPORT " + json.dumps(report))
"""


def _child(args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


@pytest.mark.skipif(ON_GPU, reason="binds launches for a stand-in sm_90 target: a CPU-only check")
def test_launch_plans_are_recorded_once_and_replayed():
    out = _child(["-c", _PLAN_SCRIPT])
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.split("REPORT ", 1)[1])
    assert report["launches"] == [4, 4]  # forward; Δ, dK/dV, dQ
    assert report["plans_after_two"] == 2  # one forward and one backward plan, replayed the second time
    assert report["plans_after_three"] == 2
    assert report["odd_launches"] == 4 and report["plans_with_odd"] == 4  # misaligned inputs: new plans
    assert report["plans_after_override"] == 6


@pytest.mark.skipif(ON_GPU, reason="the CPU host-cost benchmark (launches bound for sm_90, not run)")
def test_host_benchmark_rows(tmp_path):
    path = tmp_path / "host.json"
    out = _child(["-m", "benchmarks.host", "--rounds", "1", "--calls", "3", "--out", str(path)])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["op"]: r for r in json.loads(path.read_text())["rows"]}
    assert rows["image_attention"]["fused"]["launches"] == 4
    assert rows["window_attention"]["fused"]["launches"] == 6  # fwd; Δ, dK/dV, dQ, d-table, its sums
    for row in rows.values():
        assert row["sdpa"]["launches"] == 0 and row["fused"]["host_us"] > 0 and row["ratio"] > 0
