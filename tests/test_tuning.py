"""``attnsr tune`` and ``auto`` end to end on the CPU: the kernels run in Triton's interpreter and the
timer is a stub (there is no GPU clock here), so what is checked is the plumbing: candidates, the
gate and numerics checks, the budget, the table written atomically under the cache directory, the
launchers and ``auto`` reading it, and the refusals."""

import importlib
import json
import os

import pytest
import torch

from attnsr import backends, tune
from attnsr.kernels import _tuned
from conftest import DEVICE, ON_GPU, error_line

attn = importlib.import_module("attnsr.kernels.attention")
win = importlib.import_module("attnsr.kernels.window_attention")

ATTENTION = tune.Case("attention", "float32", (1, 16, 4, 6, 1, 1), "train")  # D 16, 24 tokens
WINDOW = tune.Case("window", "float32", (1, 8, 8, 16, 2, 4, 2), "train")  # 4×4 windows, shifted, bias table
GATE = tune.Case("channel_gate", "float32", (2, 16, 5, 5), "train")

pytestmark = pytest.mark.skipif(ON_GPU, reason="the stubbed timer and the CPU cache file are for a CPU run")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSR_CACHE_DIR", str(tmp_path))
    _tuned.forget()
    yield
    _tuned.forget()


def _stub_timer(fast):
    """A timer that times nothing: 1 ms for a candidate ``fast(settings)`` likes, else 2 ms; in the
    auto rounds (no override active) the fused call, timed first, 1 ms and the torch path 2 ms."""
    calls = []

    def timer(fn):
        for module in (attn, win):
            for cfg in module._OVERRIDES.values():
                return 1.0 if fast(cfg) else 2.0
        calls.append(fn)
        return 1.0 if len(calls) % 2 else 2.0

    return timer


def _one_stage(cfg):
    return cfg.get("num_stages") == 1


def test_tune_end_to_end_with_a_stub_timer(tmp_path):
    table = tune.run([ATTENTION, WINDOW, GATE], device="cpu", timer=_stub_timer(_one_stage), most=2, log=print)
    path = _tuned.cache_file(torch.device("cpu"))
    assert os.path.dirname(path) == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]  # no temporary file left
    with open(path) as f:
        written = json.load(f)
    assert written["format"] == _tuned.FORMAT and written["launch"] == table["launch"]
    want = {tune.launch_key(ATTENTION, k) for k in ("fwd", "bwd")}
    want |= {tune.launch_key(WINDOW, k) for k in ("fwd", "dkdv", "dq")}
    assert set(written["launch"]) == want
    assert all(cfg["num_stages"] == 1 for cfg in written["launch"].values())
    # the launchers read it: the attention's fwd kernel of that shape class, and a window's dkdv
    cpu = torch.device("cpu")
    _, launch = attn._config("fwd", 16, torch.float32, 1, None, (cpu, 24, 1))
    assert launch["num_stages"] == 1
    _, launch = win._config("dkdv", 8, torch.float32, 16, cpu)
    assert launch["num_stages"] == 1
    # auto's choices, under the keys backends computes for the same calls
    keys = {row["key"]: row["status"] for row in written["rows"] if row["kernel"] == "auto"}
    assert keys == {tune._Calls(c, cpu).key(): "triton" for c in (ATTENTION, WINDOW, GATE)}
    assert written["backend"] == keys


def test_tuned_settings_keep_the_results(tmp_path):
    """The kernels with the tuned settings (16-row tiles where the stub liked them) against float64."""
    tune.run([ATTENTION], device="cpu", timer=_stub_timer(lambda c: c["BLOCK_M"] == 16), most=10, log=print)
    assert any(cfg["BLOCK_M"] == 16 for cfg in _tuned.table(torch.device("cpu"))["launch"].values())
    from attnsr.kernels import image_attention
    from attnsr.kernels.reference import image_attention_ref
    from tolerances import assert_close_rel

    qkv = torch.randn(1, 48, 4, 6, dtype=torch.float32, requires_grad=True)
    out = image_attention(*qkv.split(16, 1))
    ref = image_attention_ref(*qkv.split(16, 1), upcast=True)
    assert_close_rel(out, ref, torch.float32, "output with tuned tiles")
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, qkv, grad)
    (want,) = torch.autograd.grad(ref, qkv, grad.double())
    assert_close_rel(got, want, torch.float32, "dqkv with tuned tiles")


def test_the_gate_and_the_numerics_check_reject_candidates(monkeypatch):
    def no_spills(record):
        return None if attn._OVERRIDES.get("fwd", {}).get("num_warps") is None else "gate: spills (8 registers)"

    table = tune.run([tune.Case("attention", "float32", (1, 16, 4, 6, 1, 1), "infer")], device="cpu",
                     timer=_stub_timer(_one_stage), gate_fn=no_spills, most=3, log=print)
    statuses = [r["status"] for r in table["rows"] if r["kernel"] == "fwd"]
    assert statuses[0] == "ok" and statuses[1:] == ["gate: spills (8 registers)"] * 2
    assert table["launch"] == {}  # nothing passed: the shipped setting stays
    monkeypatch.setitem(tune.TUNE_AGREE, "float32", -1.0)  # no candidate can agree with the shipped outputs
    table = tune.run([tune.Case("attention", "float32", (1, 16, 4, 6, 1, 1), "infer")], device="cpu",
                     timer=_stub_timer(_one_stage), most=2, log=print)
    fwd = [r for r in table["rows"] if r["kernel"] == "fwd"]
    assert fwd[1]["status"].startswith("wrong: ") and table["launch"] == {}


def test_the_budget_stops_the_run_and_the_table_is_still_written():
    table = tune.run([ATTENTION, GATE], device="cpu", timer=_stub_timer(_one_stage), budget_s=0, log=print)
    assert table["launch"] == {} and table["backend"] == {}
    assert {r["status"] for r in table["rows"]} == {"not run: budget"}
    assert os.path.exists(_tuned.cache_file(torch.device("cpu")))


def test_a_second_run_keeps_the_classes_of_the_first():
    tune.run([ATTENTION], device="cpu", timer=_stub_timer(_one_stage), most=2, log=print)
    first = dict(_tuned.table(torch.device("cpu"))["backend"])
    tune.run([GATE], device="cpu", timer=_stub_timer(_one_stage), most=2, log=print)
    assert first.items() <= _tuned.table(torch.device("cpu"))["backend"].items()
    assert len(_tuned.table(torch.device("cpu"))["backend"]) == 2


def test_nothing_is_timed_in_a_compile_trace_or_without_a_timer(monkeypatch):
    with pytest.raises(RuntimeError, match="no GPU to time"):
        tune.run([GATE], device="cpu")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match=r"torch\.compile trace"):
        tune.run([GATE], device="cpu", timer=_stub_timer(_one_stage))


def test_a_table_of_another_format_is_ignored_with_a_warning(tmp_path):
    path = _tuned.cache_file(torch.device("cpu"))
    _tuned.write(path, {"format": 99, "launch": {tune.launch_key(ATTENTION, "fwd"): {"BLOCK_M": 16}}})
    with pytest.warns(UserWarning, match="format 99"):
        assert _tuned.table(torch.device("cpu")) == {}
    with open(path, "w") as f:
        f.write("{not json")
    _tuned.forget()
    with pytest.warns(UserWarning, match="ignoring the tuned table"):
        assert _tuned.table(torch.device("cpu")) == {}


def test_an_unusable_tuned_setting_falls_back_with_a_warning():
    key = tune.launch_key(ATTENTION, "fwd")
    _tuned.write(_tuned.cache_file(torch.device("cpu")), {"format": 1, "launch": {key: {"BLOCK_M": 24}}})
    with pytest.warns(UserWarning, match="not usable"):
        blocks, _ = attn._config("fwd", 16, torch.float32, 1, None, (torch.device("cpu"), 24, 1))
    assert blocks["BLOCK_M"] == 32  # the interpreter's shipped tiles


class _OnCuda:
    """What ``resolve`` reads of a tensor, as a CUDA tensor would have it, on the CPU's tuned table."""

    is_cuda = True
    device = torch.device("cpu")


def test_auto_takes_the_measured_choice_else_the_shipped_one():
    key = "attention/bf16/d64/p1/n4096/bh4/train"
    assert backends.resolve("auto", _OnCuda(), lambda: key) == "torch"  # shipped: SDPA was faster on the H200
    _tuned.write(_tuned.cache_file(torch.device("cpu")), {"format": 1, "backend": {key: "triton"}})
    assert backends.resolve("auto", _OnCuda(), lambda: key) == "triton"
    assert backends.resolve("auto", torch.zeros(1), lambda: key) == "torch"  # CPU tensors: the torch path
    assert backends.resolve("triton", torch.zeros(1)) == "triton"


@pytest.mark.parametrize("key, want", [
    ("attention/fp32/d64/p1/n4096/bh4/infer", "triton"),  # fp32 forward 1.40-1.50x SDPA
    ("attention/tf32/d32/p1/n16384/bh1/infer", "triton"),
    ("attention/fp32/d64/p1/n4096/bh4/train", "torch"),  # fwd+bwd 0.96-1.01x: a tie goes to torch
    ("attention/fp32/d128/p1/n16384/bh1/infer", "torch"),  # 0.86x
    ("attention/fp32/d64/p1/n1024/bh16/infer", "torch"),  # small maps 0.57x
    ("attention/fp32/d256/p2/n1024/bh4/infer", "torch"),  # 2x2 patches 0.15-0.32x
    ("attention/bf16/d64/p1/n16384/bh1/infer", "torch"),
    ("attention/fp16/d64/p1/n16384/bh1/infer", "torch"),
    ("window/bf16/d32/n256/train", "triton"),  # HAB bf16 fwd+bwd 1.25x
    ("window/fp16/d32/n256/train", "triton"),
    ("window/fp32/d32/n256/train", "torch"),
    ("cbam_gate/bf16/d128/n65536/train", "torch"),
    ("layer_fusion/fp32/n65536/train", "torch"),
])
def test_shipped_choices_follow_the_h200_run(key, want):
    assert backends.shipped_choice(key) == want


def test_auto_key_of_a_layer_call():
    x = torch.randn(2, 96, 8, 8, requires_grad=True)
    key = backends.auto_key("attention", x, head_dim=32, tokens=64, batch_heads=2, mode=backends._mode(x))
    assert key == "attention/fp32/d32/p1/n64/bh2/train"
    with torch.no_grad():
        assert backends._mode(x) == "infer"


def test_cli_tune_says_it_needs_a_gpu(capsys):
    from attnsr.cli import main

    assert main(["tune", "--quick"]) == 2
    assert "attnsr tune times the kernels on a GPU" in error_line(capsys)


def test_the_default_cases_build_their_keys():
    """Every default case names its shape classes (on the CPU: the keys, not the runs)."""
    for case in tune.CASES + tune.QUICK_CASES:
        calls = tune._Calls(tune.Case(case.op, case.dtype, _small(case), case.mode), torch.device("cpu"))
        assert calls.key().startswith(case.op + "/")
        if case.op in tune.KERNELS:
            assert tune.launch_key(case, "fwd").startswith(case.op + "/fwd/")


def _small(case):
    """The case's shape with its sizes cut down to build quickly (the head dims kept)."""
    s = case.shape
    if case.op == "attention":
        return (1, s[1], 4 * s[5], 4 * s[5], s[4], s[5])
    if case.op == "window":
        return (1, s[5], s[5], s[3], s[4], s[5], s[6])
    if case.op == "layer_fusion":
        return (s[0], 1, s[2], 4, 4)
    return (1, s[1], 4, 4)


def test_device_is_cpu_here():
    assert DEVICE.type == "cpu"
