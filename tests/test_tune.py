"""The attention kernels' launch-configuration table, the tuner's override, and benchmarks/tune.py.

On CPU the kernels run in Triton's interpreter, where num_warps and num_stages mean nothing but
block sizes do: every block-size pair of the table and of a few overrides (unequal BLOCK_M and
BLOCK_N, a different pair per kernel) must give the reference's output and gradients at odd N.
"""

import contextlib
import itertools
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import DEVICE
from tolerances import assert_close_rel

import attnsr.kernels.attention as attn
from benchmarks import tune
from attnsr.kernels import flash_attention, image_attention
from attnsr.kernels.reference import flash_attention_ref, image_attention_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOPPER_SMEM = 227 * 1024


def _all(block_m, block_n):
    """Every kernel's override: the Δ kernel takes BLOCK_M only (no key blocks)."""
    return {k: dict(BLOCK_M=block_m) if k == "delta" else dict(BLOCK_M=block_m, BLOCK_N=block_n)
            for k in attn._KERNELS}


TABLE_BLOCKS = sorted({(e.block_m, e.block_n) for e in attn._LAUNCH.values() if e is not None and e.block_n is not None})  # noqa: E501
OVERRIDES = {
    **{f"table {m}x{n}": _all(m, n) for m, n in TABLE_BLOCKS},
    "16x64": _all(16, 64),
    "64x16": _all(64, 16),
    "per kernel": dict(fwd=dict(BLOCK_M=16, BLOCK_N=64), delta=dict(BLOCK_M=64),
                       dkdv=dict(BLOCK_M=16, BLOCK_N=32), dq=dict(BLOCK_M=64, BLOCK_N=16)),
}


def _apply(stack, overrides):
    for kernel, cfg in overrides.items():
        stages = {} if kernel == "delta" else dict(num_stages=2)  # the Δ kernel has no loop
        stack.enter_context(attn._launch_override(kernel, num_warps=4, **stages, **cfg))


def check_outputs_and_grads(fn, ref, inputs, dtype, what):
    out = fn(*inputs)
    expect = ref(*inputs)
    assert_close_rel(out, expect, dtype, f"{what}: output")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expect, inputs, grad.double())
    for name, g, w in zip(["qkv"] if len(inputs) == 1 else "qkv", got, want):
        assert_close_rel(g, w, dtype, f"{what}: d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(OVERRIDES))
def test_override_matches_reference_on_fused_qkv_map(name, dtype, monkeypatch):
    """q, k, v split out of one NCHW map (the tuner's layout); 5×9 = 45 tokens, two heads of D = 16.
    Every kernel is launched with its override's tiles."""
    launched = {}
    plain = attn._config

    def spy(kernel, *args, **kwargs):
        blocks, launch = plain(kernel, *args, **kwargs)
        launched[kernel] = (blocks, launch)
        return blocks, launch

    monkeypatch.setattr(attn, "_config", spy)
    qkv = torch.randn(2, 96, 5, 9, device=DEVICE, dtype=torch.float64).to(dtype).requires_grad_()

    def fn(x):
        return image_attention(*x.split(32, 1), heads=2)

    def ref(x):
        return image_attention_ref(*x.split(32, 1), heads=2, upcast=True)

    deterministic = torch.are_deterministic_algorithms_enabled()
    with contextlib.ExitStack() as stack:
        _apply(stack, OVERRIDES[name])
        check_outputs_and_grads(fn, ref, (qkv,), dtype, f"map {name}")  # the one-pass backward
        stack.callback(torch.use_deterministic_algorithms, deterministic)
        torch.use_deterministic_algorithms(True)  # the deterministic one: its dK/dV and dQ entries
        check_outputs_and_grads(fn, ref, (qkv,), dtype, f"map {name}, deterministic")
    assert set(launched) == set(attn._KERNELS)
    for kernel, cfg in OVERRIDES[name].items():
        got = {**launched[kernel][0], **launched[kernel][1]}
        stages = {} if kernel == "delta" else dict(num_stages=2)
        for key, value in dict(num_warps=4, **stages, **cfg).items():
            assert got[key] == value, (kernel, key, got)
        if kernel == "delta":
            assert "BLOCK_N" not in got and "num_stages" not in got, got


@pytest.mark.parametrize("name", list(OVERRIDES))
def test_override_matches_reference_on_sequences(name):
    """N = 37 queries, M = 50 keys, D = 20: partial tiles on both sides of every block size."""
    q = torch.randn(1, 2, 37, 20, device=DEVICE, dtype=torch.float32).requires_grad_()
    k, v = (torch.randn(1, 2, 50, 20, device=DEVICE, dtype=torch.float32).requires_grad_() for _ in range(2))
    with contextlib.ExitStack() as stack:
        _apply(stack, OVERRIDES[name])
        check_outputs_and_grads(flash_attention, lambda q, k, v: flash_attention_ref(q, k, v, upcast=True), (q, k, v),
               torch.float32, f"seq {name}")


def test_override_nests_and_restores():
    with attn._launch_override("dq", BLOCK_M=16):
        with attn._launch_override("dq", BLOCK_N=128, num_warps=8):
            blocks, launch = attn._config("dq", 64, torch.float16)
            assert (blocks["BLOCK_M"], blocks["BLOCK_N"], launch["num_warps"]) == (16, 128, 8)
        assert attn._OVERRIDES == {"dq": {"BLOCK_M": 16}}
        assert attn._config("dq", 64, torch.float16)[0]["BLOCK_M"] == 16
    assert attn._OVERRIDES == {}


@pytest.mark.parametrize("kernel, cfg, message", [
    ("dk", dict(BLOCK_M=16), "kernel 'dk'"),
    ("fwd", dict(BLOCK_M=24), "BLOCK_M = 24; expected a power of two >= 16"),
    ("fwd", dict(BLOCK_N=8), "BLOCK_N = 8"),
    ("dq", dict(num_warps=3), "num_warps = 3"),
    ("dq", dict(num_stages=0), "num_stages = 0"),
    ("dq", dict(BLOCK_K=16), "setting 'BLOCK_K'"),
    ("dq", dict(BLOCK_M=32.0), "expected an int"),
    ("delta", dict(BLOCK_N=64), "BLOCK_N for the Δ kernel, which has no key blocks and no loop"),
    ("delta", dict(num_stages=2), "num_stages for the Δ kernel"),
    ("delta", dict(BLOCK_DC=16), "BLOCK_DC for the Δ kernel"),
    ("dq", dict(SPLIT=1), "SPLIT for the dq kernel, which has one accumulator"),
    ("fwd", dict(SPLIT=1), "SPLIT for the fwd kernel"),
    ("dkdv", dict(SPLIT=2), "SPLIT = 2; expected 0 or 1"),
    ("dkdv", dict(BLOCK_DC=24), "BLOCK_DC = 24; expected 0"),
    ("dq", dict(BLOCK_DC=8), "BLOCK_DC = 8"),
])
def test_override_rejects_bad_settings(kernel, cfg, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        with attn._launch_override(kernel, **cfg):
            pass
    assert attn._OVERRIDES == {}


def test_table_is_complete_and_fits():
    """One entry per (kernel, BLOCK_D, dtype class); tiles are powers of two >= 16 whose streamed
    tiles fit in a Hopper block's shared memory by the estimate the tuner prunes with."""
    keys = {(k, d, c) for k in attn._KERNELS for d in (16, 32, 64, 128, 256) for c in attn._DTYPE_CLASSES}
    assert set(attn._LAUNCH) == keys
    elt = {"16bit": 2, "fp32": 4, "fp64": 8}
    for (kernel, block_d, cls), e in attn._LAUNCH.items():
        if e is None:  # no spill-free one-pass backward: such calls take the deterministic one
            assert kernel == "bwd" and cls == "fp32", (kernel, block_d, cls)
            continue
        if kernel == "delta":  # one block of rows per program, no loop: no key blocks, no pipelining
            assert e.block_n is None and e.num_stages is None, (kernel, block_d, cls, e)
        blocks = (e.block_m,) if kernel == "delta" else (e.block_m, e.block_n)
        for b in blocks:
            assert b >= 16 and b & (b - 1) == 0, (kernel, block_d, cls, e)
        assert e.num_warps in (1, 2, 4, 8, 16) and (kernel == "delta" or e.num_stages >= 1), (kernel, block_d, cls, e)
        smem = attn._shared_memory_estimate(kernel, e.block_m, e.block_n, block_d, elt[cls], e.num_stages)
        assert smem <= HOPPER_SMEM, (kernel, block_d, cls, e, smem)
        # a chunk is a power of two >= 16 below the padded head dim (no chunks on the Δ kernel);
        # only dK/dV splits
        assert e.chunk == 0 or (kernel != "delta" and 16 <= e.chunk < block_d and e.chunk & (e.chunk - 1) == 0), e
        assert not e.split or kernel in ("bwd", "dkdv"), (kernel, block_d, cls, e)
    for key, e in attn._PATCH_LAUNCH.items():
        assert e is None or e.chunk == 0 or 16 <= e.chunk < key[1], (key, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("settings", [
    dict(fwd=dict(BLOCK_DC=16), bwd=dict(BLOCK_DC=16, SPLIT=1), dq=dict(BLOCK_DC=16)),
    dict(bwd=dict(SPLIT=1)),
    dict(bwd=dict(BLOCK_DC=16), dq=dict(BLOCK_DC=32)),
], ids=["chunked and split", "split", "chunked"])
@pytest.mark.parametrize("what", ["sequence", "map with patches"])
def test_chunked_and_split_launches_match_reference(what, settings, dtype, monkeypatch):
    """The launch settings the table uses where holding a tile spills: S (and dP) summed over
    16-wide chunks of the head dim, dV and dK in two launches. Head dim 40: the chunk past it is
    partly masked (32-47) and the last one (48-63) wholly. Every part of a split runs once."""
    launches = []
    kernel = attn._attn_bwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs.get("PART"))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(attn, "_attn_bwd_kernel", Spy())
    with contextlib.ExitStack() as stack:
        for name, cfg in settings.items():
            stack.enter_context(attn._launch_override(name, BLOCK_M=16, BLOCK_N=32, **cfg))
        if what == "sequence":
            q = torch.randn(1, 2, 37, 40, device=DEVICE, dtype=dtype).requires_grad_()
            k, v = (torch.randn(1, 2, 50, 40, device=DEVICE, dtype=dtype).requires_grad_() for _ in range(2))
            check_outputs_and_grads(flash_attention, lambda q, k, v: flash_attention_ref(q, k, v, upcast=True),
                                    (q, k, v), dtype, f"seq {settings}")
        else:  # 2×2 patches of a fused-qkv NCHW map: 6×5 = 30 tokens, two heads of D = 4·10 = 40
            qkv = torch.randn(1, 60, 12, 10, device=DEVICE, dtype=dtype).requires_grad_()
            check_outputs_and_grads(lambda x: image_attention(*x.split(20, 1), heads=2, patch_size=2),
                                    lambda x: image_attention_ref(*x.split(20, 1), heads=2, patch_size=2, upcast=True),
                                    (qkv,), dtype, f"patches {settings}")
    assert launches == ([1, 2] if settings["bwd"].get("SPLIT") else [0]), launches


# ----------------------------------------------------------------------------------------------
# benchmarks/tune.py
# ----------------------------------------------------------------------------------------------


def test_measure_flags_wrong_outputs_and_records_errors():
    row = tune._candidates("fwd", 32, "float32", True, HOPPER_SMEM)[1]
    reference = (torch.ones(4, 4),)
    args = type("Args", (), dict(warmup_ms=1, rep_ms=1))
    _, alive = tune._measure(dict(row), lambda: (torch.ones(4, 4),), reference, torch.device("cpu"), 1.0, args)
    assert alive
    wrong = dict(row)
    tune._measure(wrong, lambda: (torch.full((4, 4), 1.5),), reference, torch.device("cpu"), 1.0, args)
    assert wrong["status"].startswith("wrong: differs from the default by 5.00e-01"), wrong["status"]
    unwritten = dict(row)
    tune._measure(unwritten, lambda: (torch.full((4, 4), float("nan")),), reference, torch.device("cpu"), 1.0, args)
    assert unwritten["status"].startswith("wrong"), unwritten["status"]

    def fails():
        raise RuntimeError("out of resource: shared memory, Required: 300000\nmore")

    failed = dict(row)
    _, alive = tune._measure(failed, fails, reference, torch.device("cpu"), 1.0, args)
    assert alive and failed["status"] == "error: RuntimeError: out of resource: shared memory, Required: 300000"
    assert failed["median_ms"] is None


def test_candidates_are_pruned_by_shared_memory_and_registers(monkeypatch):
    monkeypatch.setattr(attn, "interpreting", lambda: False)
    rows = tune._candidates("dkdv", 256, "float32", False, HOPPER_SMEM)
    assert rows[0]["default"] and rows[0]["status"] == "pending"
    grid = [dict(zip(tune.SETTINGS, v)) for v in itertools.product(*tune.GRID.values())]
    default = {k: rows[0][k] for k in tune.SETTINGS}
    assert len(rows) == 1 + sum(c != default for c in grid)  # the default and the rest of the 3·3·2·3 grid
    pruned = [r for r in rows if r["status"].startswith("pruned")]
    kept = [r for r in rows if r["status"] == "pending"]
    assert pruned and kept
    assert all(r["smem_estimate_kib"] * 1024 <= HOPPER_SMEM for r in kept)
    assert any("registers" in r["status"] for r in pruned)
    assert not any(r["BLOCK_M"] == 128 and r["num_stages"] == 3 for r in kept)  # 4·3·2·128·256 B > 227 KiB


FAKE_WORKER = r"""
import json, sys
tasks = json.load(sys.stdin)["tasks"]
if len(tasks) == 1 and tasks[0]["id"] == 4:
    sys.exit(5)  # dies on its first task, every time
print("noise on stdout")
print("tune-result " + json.dumps({"id": tasks[0]["id"], "status": "ok", "compile_s": 0.5}), flush=True)
sys.stderr.write("Segmentation fault\n")
sys.exit(3)  # dies on the second task it was given
"""


def test_precompile_survives_dying_workers(tmp_path, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(tune, "WORKER_COMMAND", (sys.executable, str(script)))
    tasks = [dict(id=i) for i in range(5)]
    done = tune._precompile(tasks, 1, {}, time.monotonic() + 60)
    assert done[0] == ("ok", 0.5) and done[2] == ("ok", 0.5)
    assert done[1][0].startswith("crashed: compile worker exited with code 3 Segmentation fault")
    assert done[3][0].startswith("crashed")
    assert done[4][0].startswith("crashed: compile worker exited with code 5")


def test_suggest_shares_the_16bit_entry_and_keeps_the_default_within_noise():
    def row(dtype, bm, ms, default=False, status="ok"):
        return dict(kernel="fwd", head_dim=64, block_d=64, dtype=dtype, BLOCK_M=bm, BLOCK_N=64, num_warps=4,
                    num_stages=2, median_ms=ms, status=status, default=default)

    payload = dict(
        info=dict(device="GPU", interpreter=False),
        groups=[dict(kernel="fwd", head_dim=64, dtype=d, spread=0.01) for d in ("bfloat16", "float16", "float32")],
        rows=[row("bfloat16", 64, 2.0, True), row("float16", 64, 2.0, True),
              row("bfloat16", 128, 1.0), row("float16", 128, 1.6),  # best on average over both
              row("bfloat16", 32, 0.9), row("float16", 32, 9.0, status="wrong: ..."),  # wrong in fp16
              row("float32", 64, 4.0, True), row("float32", 128, 3.95)],  # within noise: kept
    )
    lines = tune.suggest(payload)
    assert lines[0].startswith('    ("fwd", 64, "16bit"): _Launch(128, 64, 4, 2),  # GPU: bfloat16 1.000 ms 2.00x')
    assert "float16 1.600 ms 1.25x; was 64x64 w4 s2" in lines[0]
    assert lines[1].startswith('    ("fwd", 64, "fp32"): _Launch(64, 64, 4, 2),') and lines[1].endswith("kept")


def test_register_pruning_counts_one_accumulator_for_a_split_dkdv(monkeypatch):
    """A split dK/dV launch holds one BLOCK_N × D accumulator, not two: 128 keys at head dim 128 on
    4 warps fit (128 registers) where the split entry runs, and are pruned where dK and dV share
    one launch (256)."""
    monkeypatch.setattr(attn, "interpreting", lambda: False)
    assert attn._LAUNCH[("dkdv", 128, "fp32")].split and not attn._LAUNCH[("dkdv", 128, "16bit")].split

    def wide(dtype):
        return [r for r in tune._candidates("dkdv", 128, dtype, False, HOPPER_SMEM)
                if r["BLOCK_N"] == 128 and r["num_warps"] == 4]

    assert wide("float32") and not any("registers" in r["status"] for r in wide("float32"))
    assert wide("bfloat16") and all("registers" in r["status"] for r in wide("bfloat16"))


def test_suggest_keeps_the_entrys_chunk_and_split():
    """The candidates of a chunked, split entry ran with its chunk and split: the line keeps them."""
    entry = attn._LAUNCH[("dkdv", 128, "fp32")]
    assert entry.chunk and entry.split
    rows = [dict(kernel="dkdv", head_dim=128, block_d=128, dtype="float32", BLOCK_M=bm, BLOCK_N=64, num_warps=4,
                 num_stages=2, median_ms=ms, status="ok", default=default)
            for bm, ms, default in ((entry.block_m, 2.0, True), (32, 1.0, False))]
    payload = dict(info=dict(device="GPU", interpreter=False), rows=rows,
                   groups=[dict(kernel="dkdv", head_dim=128, dtype="float32", spread=0.01)])
    (line,) = tune.suggest(payload)
    assert line.startswith(f'    ("dkdv", 128, "fp32"): _Launch(32, 64, 4, 2, chunk={entry.chunk}, split=True),'), line


def test_quick_run_writes_json(tmp_path):
    """The whole tuner in a subprocess: compile workers, checks, timings, table, JSON."""
    out = tmp_path / "tune.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.tune", "--quick", "--out", str(out), "--jobs", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert {"device", "torch", "triton", "shape", "budget_s"} <= set(payload["info"])
    rows = payload["rows"]
    assert len(rows) == 3 * 2 * 3  # kernels × dtypes × (default + 2 candidates)
    assert all(r["status"] == "ok" and r["median_ms"] > 0 and r["precompiled"] for r in rows), rows
    assert all(r["rel_err"] <= tune.AGREE[r["dtype"]] for r in rows)
    assert len(payload["groups"]) == 6 and all(g["best"] for g in payload["groups"])
    assert "speed-up" in proc.stdout and "fwd" in proc.stdout


FAILURE = "_attn_fwd_kernel [attention fp32 D=64 fused, sm_90]: spills: 56 B stack, 15 spill stores"


def test_candidates_that_break_the_compile_gate_are_marked(monkeypatch):
    """On an sm_90 / sm_80 GPU a compile worker asks the compile report about its candidate; a
    failure becomes the row's status (so the candidate is neither timed nor proposed)."""
    from attnsr.kernels import compile_report

    asked = []

    def check_config(kernel, head_dim, dtype, cfg, archs):
        asked.append((kernel, head_dim, dtype, archs))
        return [], [FAILURE]

    monkeypatch.setattr(compile_report, "check_config", check_config)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    task = dict(kernel="fwd", head_dim=64, dtype="float32", cfg=dict(BLOCK_M=64, BLOCK_N=64))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    assert tune._gate(task) == "gate: " + FAILURE
    assert asked == [("fwd", 64, "fp32", (90,))]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (8, 6))  # no rules for sm_86
    assert tune._gate(task) is None


def test_patches_take_their_own_entry_where_there_is_one(monkeypatch):
    """With p > 1 the launcher looks up _PATCH_LAUNCH first (the pixel entry spills there), else
    the _LAUNCH entry; pixels always take _LAUNCH."""
    monkeypatch.setattr(attn, "interpreting", lambda: False)
    for (kernel, block_d, dtype_class), entry in attn._PATCH_LAUNCH.items():
        dtype = {"16bit": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[dtype_class]
        if entry is None:  # no one-pass backward with patches there (the deterministic launch runs)
            assert attn._config(kernel, block_d, dtype, 2) is None and attn._config(kernel, block_d, dtype, 1)
            continue
        assert attn._config(kernel, block_d, dtype, 2)[0]["BLOCK_M"] == entry.block_m
        assert attn._config(kernel, block_d, dtype, 2)[1]["num_warps"] == entry.num_warps
        plain = attn._LAUNCH[(kernel, block_d, dtype_class)]
        assert attn._config(kernel, block_d, dtype, 1)[0]["BLOCK_N"] == plain.block_n
    plain = attn._LAUNCH[("fwd", 128, "16bit")]
    assert ("fwd", 128, "16bit") not in attn._PATCH_LAUNCH
    assert attn._config("fwd", 128, torch.bfloat16, 2)[0]["BLOCK_M"] == plain.block_m
