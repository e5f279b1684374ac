"""The host path of the attention ops: one gradient buffer for a packed qkv map, checks skipped for
a call seen before (and only then), launch plans recorded once and replayed.

The launch plans only exist where kernels reach a compiled kernel's launcher, which the interpreter
never does: those tests run ``benchmarks.host`` in a child process without TRITON_INTERPRET, where
each launch is bound for an sm_90 target and not run (as the host-cost benchmark does)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from attnsr.kernels import (flash_attention, image_attention, image_attention_qkv, window_attention,
                            window_attention_qkv)
from attnsr.kernels.reference import image_attention_ref, window_attention_ref
from conftest import DEVICE, ON_GPU
from tolerances import assert_close_rel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_packed_op_writes_one_gradient_for_the_qkv_map():
    """No SplitBackward between the op and the projection: the gradient goes to it whole, and it
    equals the float64 reference's, also where a part is used elsewhere too."""
    qkv = torch.randn(2, 48, 5, 7, device=DEVICE, requires_grad=True)
    out = image_attention_qkv(qkv, heads=2)
    names = {type(fn).__name__ for fn, _ in out.grad_fn.next_functions if fn is not None}
    assert names == {"AccumulateGrad"}, names
    loss = out.square().sum() + 3 * qkv[:, :16].sum()
    ref_q, ref_k, ref_v = qkv.double().split(16, 1)
    ref = image_attention_ref(ref_q, ref_k, ref_v, heads=2)
    ref_loss = ref.square().sum() + 3 * ref_q.sum()
    (got,) = torch.autograd.grad(loss, qkv)
    (want,) = torch.autograd.grad(ref_loss, qkv)
    assert_close_rel(got, want, torch.float32, "dqkv through the packed op and a part's other use")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_packed_and_split_views_agree(layout):
    qkv = torch.randn(2, 36, 4, 6, device=DEVICE, dtype=torch.float64)
    if layout == "channels_last":
        qkv = qkv.to(memory_format=torch.channels_last)
    qkv.requires_grad_()
    grad = torch.randn(2, 12, 4, 6, device=DEVICE, dtype=torch.float64)
    packed = torch.autograd.grad(image_attention_qkv(qkv, heads=3), qkv, grad)[0]
    views = torch.autograd.grad(image_attention(*qkv.split(12, 1), heads=3), qkv, grad)[0]
    assert packed.stride() == qkv.stride()  # laid out like the map it belongs to
    assert_close_rel(packed, views, torch.float64, "packed dqkv against the views'")


def test_gradients_of_the_views_themselves_and_their_hooks():
    """image_attention on three views keeps them in the graph: a gradient with respect to a view,
    and a hook on one, work as for any op."""
    qkv = torch.randn(1, 24, 3, 5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.split(8, 1)
    out = image_attention(q, k, v, heads=2)
    got = torch.autograd.grad(out.sum(), (q, v), retain_graph=True)
    want = torch.autograd.grad(image_attention_ref(q, k, v, heads=2, upcast=True).sum(), (q, v))
    for g, w, name in zip(got, want, "qv"):
        assert_close_rel(g, w, torch.float64, f"d{name} of a view")
    seen = []
    k.register_hook(lambda g: seen.append(g.shape))
    out.sum().backward()
    assert seen == [torch.Size([1, 8, 3, 5])]


def test_the_packed_window_op_writes_one_gradient():
    qkv = torch.randn(1, 64, 48, device=DEVICE, dtype=torch.float64, requires_grad=True)
    table = torch.randn(49, 2, device=DEVICE, dtype=torch.float64, requires_grad=True)
    args = dict(window_size=4, shift_size=2, heads=2, bias_table=table)
    out = window_attention_qkv(qkv.view(1, 8, 8, 48), **args)
    names = {type(fn).__name__ for fn, _ in out.grad_fn.next_functions if fn is not None}
    assert "SplitWithSizesBackward0" not in names, names
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (qkv, table), grad)
    ref = window_attention_ref(*qkv.view(1, 8, 8, 48).split(16, -1), **args, upcast=True)
    want = torch.autograd.grad(ref, (qkv, table), grad)
    assert_close_rel(got[0], want[0], torch.float64, "dqkv")
    assert_close_rel(got[1], want[1], torch.float64, "d table")


def _copies_on_unpack():
    """Saved tensors handed back as contiguous copies at offset 0 (what ``save_on_cpu`` does on a GPU)."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t,
                                                    lambda t: t.clone(memory_format=torch.contiguous_format))


def test_gradients_survive_saved_tensor_hooks_that_copy():
    qkv = torch.randn(2, 36, 4, 6, device=DEVICE, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 12, 4, 6, device=DEVICE, dtype=torch.float64)
    want = torch.autograd.grad(image_attention_ref(*qkv.split(12, 1), heads=3), qkv, grad)[0]
    with _copies_on_unpack():
        packed = image_attention_qkv(qkv, heads=3)
        views = image_attention(*qkv.split(12, 1), heads=3)
    assert_close_rel(torch.autograd.grad(packed, qkv, grad)[0], want, torch.float64, "packed dqkv, copied saves")
    assert_close_rel(torch.autograd.grad(views, qkv, grad)[0], want, torch.float64, "dqkv of views, copied saves")
    wqkv = torch.randn(1, 8, 8, 48, device=DEVICE, dtype=torch.float64, requires_grad=True)
    table = torch.randn(49, 2, device=DEVICE, dtype=torch.float64, requires_grad=True)
    args = dict(window_size=4, shift_size=2, heads=2, bias_table=table)
    with _copies_on_unpack():
        out = window_attention_qkv(wqkv, **args)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (wqkv, table), g)
    want = torch.autograd.grad(window_attention_ref(*wqkv.split(16, -1), **args, upcast=True), (wqkv, table), g)
    assert_close_rel(got[0], want[0], torch.float64, "window dqkv, copied saves")
    assert_close_rel(got[1], want[1], torch.float64, "window d table, copied saves")


def test_double_backward_raises_whichever_input_needs_it():
    q = torch.randn(1, 8, 3, 3, device=DEVICE, dtype=torch.float64)
    k = torch.randn(1, 8, 3, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(image_attention(q, k, k).sum(), k, create_graph=True)
    with pytest.raises(RuntimeError, match=r"does not support double backward"):
        g.sum().backward()


def test_a_signature_seen_with_an_int_does_not_admit_a_bool():
    q = torch.randn(1, 8, 4, 4, device=DEVICE)
    image_attention(q, q, q, heads=1)
    with pytest.raises(TypeError, match=r"heads must be a positive int, got True"):
        image_attention(q, q, q, heads=True)


def test_packed_ops_refuse_a_map_that_is_not_three_parts():
    with pytest.raises(ValueError, match=r"image_attention_qkv: qkv is \(1, 8, 4, 4\); expected \(B, 3C, H, W\)"):
        image_attention_qkv(torch.randn(1, 8, 4, 4, device=DEVICE))
    with pytest.raises(ValueError, match=r"window_attention_qkv: qkv is \(1, 4, 4, 8\)"):
        window_attention_qkv(torch.randn(1, 4, 4, 8, device=DEVICE), window_size=2)
    with pytest.raises(TypeError, match=r"image_attention_qkv: qkv must be a torch.Tensor"):
        image_attention_qkv([1, 2, 3])


def test_double_backward_through_the_packed_buffer_raises():
    qkv = torch.randn(1, 12, 3, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(image_attention_qkv(qkv).sum(), qkv, create_graph=True)
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
from attnsr.kernels import image_attention_qkv
import importlib
attn = importlib.import_module("attnsr.kernels.attention")
report = {}
with host.launches_bound_not_run():
    qkv = torch.randn(1, 96, 8, 8, requires_grad=True)
    def step(x):
        return host._launches(lambda: image_attention_qkv(x).sum().backward())
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
    # 2×2 patches run packed: pack q, k, v, forward, unpack out; pack dO, Δ, dK/dV, dQ, unpack
    # dq, dk, dv into the qkv gradient buffer; the second call replays every launch
    patches = torch.randn(1, 12, 8, 8, requires_grad=True)
    def patch_step(x):
        return host._launches(lambda: image_attention_qkv(x, patch_size=2).sum().backward())
    report["patch_launches"] = [patch_step(patches), patch_step(patches)]
    report["patch_forward_launches"] = host._launches(lambda: image_attention_qkv(patches.detach(), patch_size=2))
    # the kernels of one backward call in each mode (one-pass by default, deterministic under
    # torch.use_deterministic_algorithms(True))
    def backward_kernels(x, deterministic):
        out = image_attention_qkv(x)
        torch.use_deterministic_algorithms(deterministic)
        try:
            with _runtime.recorded_launches() as record:
                out.sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
        return [kernel.name for kernel, _, _ in record]
    from attnsr.kernels import _runtime
    report["backward"] = [backward_kernels(qkv, False), backward_kernels(qkv, True)]
    half = torch.randn(1, 96, 8, 8, dtype=torch.float16, requires_grad=True)
    report["backward_fp16"] = [backward_kernels(half, False), backward_kernels(half, True)]
    # a record open on this thread sees another thread's launches (a CUDA backward runs on one),
    # and that thread records its own plan meanwhile without waiting for this block to close
    import threading
    from attnsr.kernels import _runtime
    other = torch.randn(2, 96, 8, 8, requires_grad=True)
    with _runtime.recorded_launches() as record:
        t = threading.Thread(target=lambda: image_attention_qkv(other).sum().backward())
        t.start()
        t.join(timeout=300)
    report["thread_done"] = not t.is_alive()
    report["thread_launches"] = len(record)
    # plans keep no tensor alive
    import gc, weakref
    lone = torch.randn(3, 96, 8, 8)
    ref = weakref.ref(lone)
    image_attention_qkv(lone)
    del lone
    gc.collect()
    report["tensor_freed"] = ref() is None
    # window attention over more (batch, window) pairs than one launch takes: each slice its own grid
    from attnsr.kernels import window_attention
    win = torch.randn(65537, 1, 1, 16)
    with _runtime.recorded_launches() as record:
        window_attention(win, win, win, window_size=1)
        window_attention(win, win, win, window_size=1)
    report["slice_grids"] = [grid[2] for _, grid, _ in record]
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
    assert report["launches"] == [3, 3]  # forward; Δ, dK/dV and dQ programs in one launch
    assert report["plans_after_two"] == 2  # one forward and one backward plan, replayed the second time
    assert report["plans_after_three"] == 2
    assert report["odd_launches"] == 3 and report["plans_with_odd"] == 4  # misaligned inputs: new plans
    assert report["plans_after_override"] == 6
    assert report["patch_launches"] == [8, 8] and report["patch_forward_launches"] == 3
    delta, one_pass, det, cast = ("_attn_bwd_delta_kernel", "_attn_bwd_kernel", "_attn_bwd_det_kernel",
                                  "_attn_bwd_dq_cast_kernel")
    # fp32 at head dim 32 has no spill-free one-pass setting (_LAUNCH): both modes run Δ and one
    # launch of dK/dV and dQ programs
    assert report["backward"] == [[delta, det], [delta, det]]
    # fp16: Δ (zeroing the fp32 dQ sums), the one-pass kernel, the cast into dq; deterministic: two
    assert report["backward_fp16"] == [[delta, one_pass, cast], [delta, det]]
    assert report["thread_done"] and report["thread_launches"] == 3
    assert report["tensor_freed"]
    assert report["slice_grids"] == [65535, 2, 65535, 2]  # recorded, then replayed, per slice


@pytest.mark.skipif(ON_GPU, reason="the CPU host-cost benchmark (launches bound for sm_90, not run)")
def test_host_benchmark_rows(tmp_path):
    path = tmp_path / "host.json"
    out = _child(["-m", "benchmarks.host", "--rounds", "1", "--calls", "3", "--out", str(path)])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["op"]: r for r in json.loads(path.read_text())["rows"]}
    assert rows["image_attention"]["fused"]["launches"] == 3  # fwd; Δ, dK/dV and dQ programs (fp32, D = 32)
    # fwd; dK/dV (with Δ and the table's dS sums), dQ (fp32: its own pass), the table's reduction
    assert rows["window_attention"]["fused"]["launches"] == 4
    for row in rows.values():
        assert row["sdpa"]["launches"] == 0 and row["fused"]["host_us"] > 0 and row["ratio"] > 0
