"""The compile gate: every kernel the public ops launch, compiled for sm_90 (and sm_80) on this
machine without a GPU (kernels/compile_report.py), must not spill, must fit in shared memory, must
run its attention dot products on wgmma where Hopper can, and float64 kernels must take float64
scalars; its cases cover every kernel, every launch-table entry and the shapes users run (odd maps,
benchmark shapes), less cr.WIDE_PENDING. One report run serves every test (its time:
docs/compile-report.md).
"""

import importlib
import json
import os
import subprocess
import sys

import pytest
import triton

import attnsr.kernels.attention as attn
from attnsr.kernels import compile_report as cr

win = importlib.import_module("attnsr.kernels.window_attention")  # the package exports a function of that name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

pytestmark = pytest.mark.skipif(
    not all(os.path.exists(os.path.join(TOOLS, t)) for t in ("cuobjdump", "nvdisasm", "ptxas")),
    reason=f"needs the NVIDIA tools of the Linux triton wheel in {TOOLS}",
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The gate's rows, compiled in a child process: without TRITON_INTERPRET (which this test
    session sets when there is no GPU) Triton compiles instead of interpreting."""
    path = tmp_path_factory.mktemp("compile") / "gate.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "attnsr.kernels.compile_report", "--cases", "gate", "--jobs", "2", "--json", str(path)],
        capture_output=True, text=True, timeout=900, env=env, cwd=ROOT,
    )
    assert path.exists(), (f"the report wrote no JSON (exit {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    data = json.loads(path.read_text())
    errors = [r for r in data["rows"] if "error" in r]
    assert not errors, "cases that failed to compile:\n" + "\n".join(f"{r['case']}: {r['error']}" for r in errors)
    return data


# Expectations not met yet, each with what it would take: (kernel, case prefix, kind of failure).
# A failure listed here makes its test xfail with the figures as the reason; one not listed fails
# the test; an entry that no longer fails fails the test too (remove it).
NOT_YET_MET = [
    # (kernel, case, kind of failure) expected to fail the gate. None now: the fp32 3×TF32 and
    # float64 entries that spilled holding a tile over the loop (forward at head dim 256, 128 under
    # triton 3.6; backward at 128 and 256) read it again in 16-wide chunks of the head dim, dK/dV in
    # two launches (kernels/attention.py, the table's header says why holding spills).
]


def _gate(report, marker):
    """(failures not listed in NOT_YET_MET, listed entries that no longer fail, listed ones that
    still fail) among the gate failures of kind ``marker``."""
    failures = [f for f in cr.gate_failures(report["rows"]) if marker in f]
    listed = [(k, c) for k, c, m in NOT_YET_MET if m == marker]
    known = [f for f in failures if any(f.startswith(f"{k} [{c}") for k, c in listed)]
    stale = [f"{k} [{c}]" for k, c in listed if not any(f.startswith(f"{k} [{c}") for f in known)]
    return [f for f in failures if f not in known], stale, known


def _xfail_known(known):
    if known:
        pytest.xfail("not yet met: " + "; ".join(known))


def test_no_kernel_spills_on_sm90(report):
    new, stale, known = _gate(report, "spills")
    assert not new, f"{len(new)} kernels spill on sm_90:\n" + "\n".join(new)
    assert not stale, f"no longer spilling, remove from NOT_YET_MET: {stale}"
    _xfail_known(known)


def test_shared_memory_fits(report):
    new, stale, known = _gate(report, "shared memory")
    assert not new, f"{len(new)} kernels need more shared memory than the GPU has:\n" + "\n".join(new)
    assert not stale, f"fitting now, remove from NOT_YET_MET: {stale}"
    _xfail_known(known)


def test_attention_matmuls_use_wgmma_on_sm90(report):
    new, stale, known = _gate(report, "not on wgmma")
    assert not new, f"{len(new)} attention kernels miss wgmma on sm_90:\n" + "\n".join(new)
    assert not stale, f"on wgmma now, remove from NOT_YET_MET: {stale}"
    _xfail_known(known)


def test_no_tf32_wgmma_with_n8(report):
    """No kernel issues a tf32 wgmma with N = 8: Triton leaves its shared-memory operand unpadded
    and it reads past it (triton-lang/triton#10629; on an H200 an fp32 dK/dV launch table entry
    that did so raised an illegal memory access or returned wrong gradients). Not a NOT_YET_MET
    kind: every kernel can avoid it."""
    failures = [f for f in cr.gate_failures(report["rows"]) if "N = 8" in f]
    assert not failures, f"{len(failures)} kernels issue tf32 wgmma with N = 8:\n" + "\n".join(failures)
    fp32 = [r for r in report["rows"] if r["arch"] == 90 and r["dtype"] in ("fp32", "fp32-tf32") and r["hgmma"]]
    assert fp32 and all(r["wgmma_tf32_n8"] == 0 for r in fp32)


def test_float64_kernels_take_float64_scalars(report):
    """A Python float reaches a kernel as fp32 unless its argument is typed: the softmax scale of a
    float64 attention must stay float64 (the interpreter keeps Python doubles, so only a compiled
    signature shows it)."""
    rows = [r for r in report["rows"] if r["dtype"] == "fp64" and r["kernel"] in cr.ATTENTION_DOT_KERNELS]
    assert {r["kernel"] for r in rows} == set(cr.ATTENTION_DOT_KERNELS)
    for r in rows:
        floats = {k: v for k, v in r["scalars"].items() if v.startswith(("fp", "bf"))}
        assert floats and set(floats.values()) == {"fp64"}, f"{r['kernel']} [{r['case']}]: scalars {floats}"
    assert not [f for f in cr.gate_failures(report["rows"]) if "narrower scalars" in f]


# The launch tables of kernels/ (module, name): every entry must be compiled by a gate case (or, while
# its kernels still fail, by a case of cr.WIDE_PENDING). A new table must be added here and to
# _launch_entries, which test_every_launch_table_is_known enforces.
LAUNCH_TABLES = {"_LAUNCH": attn, "_PATCH_LAUNCH": attn, "_IEEE_LAUNCH": attn, "_WIN_LAUNCH": win}
WINDOW_SHORT = {v: k for k, v in cr.WINDOW_KERNEL_NAMES.items()}
# the table kernels each compiled attention kernel takes its settings from: the deterministic
# backward's dK/dV programs the "dkdv" entry's, its dQ programs the "dq" entry's tiles; the dQ cast
# of the one-pass backward the Δ kernel's
ATTENTION_SHORT = {"_attn_fwd_kernel": ("fwd",), "_attn_bwd_delta_kernel": ("delta",),
                   "_attn_bwd_dq_cast_kernel": ("delta",), "_attn_bwd_kernel": ("bwd",),
                   "_attn_bwd_det_kernel": ("dkdv", "dq")}


def _dtype_class(dtype):
    return {"fp16": "16bit", "bf16": "16bit", "fp64": "fp64", "fp32-ieee": "fp64"}.get(dtype, "fp32")


def _attention_entry(short, block_d, dtype, patch):
    """(table name, key) of the attention launch-table entry of table kernel ``short``."""
    key = (short, block_d, _dtype_class(dtype))
    if patch > 1 and key in attn._PATCH_LAUNCH:
        return "_PATCH_LAUNCH", key
    if dtype == "fp32-ieee" and patch == 1 and key[:2] in attn._IEEE_LAUNCH:
        return "_IEEE_LAUNCH", key[:2]
    return "_LAUNCH", key


def _window_entry(short, block_d, dtype, tokens):
    """(table name, key) of the window entry of table kernel ``short`` for windows of ``tokens``."""
    cls = _dtype_class(dtype)
    d = "d32" if block_d <= 32 else "d64" if block_d <= 64 else "d256"
    if block_d == 16 and (short, "d16", cls) in win._WIN_LAUNCH:
        d = "d16"
    if short == "dkdv" and tokens <= 64 and ("dkdv1", d, cls) in win._WIN_LAUNCH:
        short = "dkdv1"  # small windows: the entry whose programs do a whole window, dQ included
    return "_WIN_LAUNCH", (short, d, cls)


def _launch_entries(kernel, block_d, dtype, patch, tokens=0) -> list:
    """The (table name, key) of the launch-table entries a launch of ``kernel`` takes, by the rules
    of the modules' ``_config`` (``tokens``: a window's); none for kernels without an entry of their
    own (the bias-table reduction, the pack kernel, the gating and transposed-attention kernels)."""
    if kernel in ATTENTION_SHORT:
        return [_attention_entry(short, block_d, dtype, patch) for short in ATTENTION_SHORT[kernel]]
    if kernel in WINDOW_SHORT:
        return [_window_entry(WINDOW_SHORT[kernel], block_d, dtype, tokens)]
    return []


def _predicted_entries(case):
    """The launch-table entries ``case`` compiles, predicted from its op, dtype, head dim, patch and
    backward mode: the one-pass backward where its entry exists and the case is not "det", else the
    deterministic one (dK/dV and dQ entries)."""
    block_d = max(16, 1 << max(0, case.head_dim - 1).bit_length())
    if case.op == "window_attention":
        window = int(case.variant[1:].rstrip("p"))
        dkdv = _window_entry("dkdv", block_d, case.dtype, window * window)
        # a whole small window per dK/dV program (its entry sets DQ) forms dQ there: no dQ launch
        dq = [] if win._WIN_LAUNCH[dkdv[1]][5:6] == (1,) else [_window_entry("dq", block_d, case.dtype, 0)]
        return {_window_entry("fwd", block_d, case.dtype, 0), dkdv, *dq}
    if case.op != "attention":
        return set()
    table, key = _attention_entry("bwd", block_d, case.dtype, case.patch)
    one_pass = case.variant != "det" and getattr(attn, table).get(key) is not None
    shorts = ("fwd", "delta") + (("bwd",) if one_pass else ("dkdv", "dq"))
    return {_attention_entry(short, block_d, case.dtype, case.patch) for short in shorts}


def _check_row_settings(r, table, key) -> bool:
    """The row was compiled with the settings of its entry; False where the row does not use the
    entry (a deterministic launch of dQ programs alone, or of dK/dV programs alone)."""
    entry = getattr(LAUNCH_TABLES[table], table)[key]
    cfg = r["config"]
    if table == "_WIN_LAUNCH":
        bm, bn, warps, _stages, *chunk = entry
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"], r["num_warps"]) == (bm, bn, warps), (key, r["case"], cfg)
        if chunk and chunk[0] and key[0] != "fwd":
            assert cfg["BLOCK_DC"] == min(chunk[0], cfg["BLOCK_D"]), (key, r["case"], cfg)
        return True
    programs = cfg.get("PROGRAMS")
    if (key[0] == "dkdv" and programs == 2) or (key[0] == "dq" and programs == 1):
        return False
    if key[0] == "dq":  # the deterministic launch's dQ programs
        assert cfg["BLOCK_M2"] == entry.block_m and cfg["BLOCK_DC2"] == min(entry.chunk, key[1]), (key, r["case"], cfg)
        return True
    assert (cfg["BLOCK_M"], r["num_warps"]) == (entry.block_m, entry.num_warps), (key, r["case"], cfg)
    if key[0] != "delta":  # the head-dim chunk, and for dK/dV which part of a split launch
        assert cfg["BLOCK_DC"] == min(entry.chunk, key[1]), (key, r["case"], cfg)
    if key[0] in ("bwd", "dkdv"):
        assert cfg["PART"] in ((1, 2) if entry.split else (0,)), (key, r["case"], cfg)
    return True


def test_gate_covers_every_kernel_and_launch_entry(report):
    """Every @triton.jit kernel of kernels/ is compiled, and every entry of every launch table
    (LAUNCH_TABLES, read from the modules) is compiled with its own settings on sm_90 by a gate case,
    or belongs to a case of cr.WIDE_PENDING (named in the failure message when it is not)."""
    rows = [r for r in report["rows"] if r["arch"] == 90]
    assert _jit_kernels() - {r["kernel"] for r in rows} == set()
    seen = set()
    for r in rows:
        tokens = r["config"].get("WH", 0) * r["config"].get("WW", 0)
        for entry in _launch_entries(r["kernel"], r["config"].get("BLOCK_D", 0), r["dtype"], r.get("patch", 1), tokens):
            if _check_row_settings(r, *entry):
                seen.add(entry)
    # the prediction used for the pending cases below agrees with what the gate's cases compiled
    predicted = set().union(*(_predicted_entries(c) for c, a in cr.gate_cases() if a == 90))
    assert predicted == seen, (sorted(predicted - seen), sorted(seen - predicted))
    # (a one-pass entry of None: no spill-free setting, such calls take the deterministic launch)
    every = {(name, key) for name, module in LAUNCH_TABLES.items() for key, e in getattr(module, name).items()
             if e is not None}
    pending = set().union(*(_predicted_entries(c) for c in cr.WIDE_PENDING))
    assert every - seen - pending == set(), "launch entries compiled by no gate case"
    only_pending = every - seen
    if only_pending:  # not silent: printed with -s / -rA, and each pending case names its failure
        print(f"launch entries compiled only by WIDE_PENDING cases: {sorted(only_pending)}")


def _jit_kernels() -> set:
    import ast
    import glob

    kernels = set()
    for path in glob.glob(os.path.join(ROOT, "kernels", "*.py")):
        for node in ast.parse(open(path).read()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                kernels.add(node.name)
    return kernels


def test_every_launch_table_is_known():
    """A module-level table named ``*_LAUNCH`` in kernels/ (a new op's launch settings) must be in
    LAUNCH_TABLES, so that the coverage test checks its entries."""
    import ast
    import glob

    tables = set()
    for path in glob.glob(os.path.join(ROOT, "kernels", "*.py")):
        for node in ast.parse(open(path).read()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            tables |= {(os.path.basename(path)[:-3], t.id) for t in targets
                       if isinstance(t, ast.Name) and t.id.endswith("_LAUNCH")}
    known = {(m.__name__.rsplit(".", 1)[-1], name) for name, m in LAUNCH_TABLES.items()}
    assert tables == known, f"launch tables not in LAUNCH_TABLES: {sorted(tables - known)}"


def _odd(size) -> bool:
    return any(s % 16 for s in size)


def test_gate_compiles_the_shapes_users_run(report):
    """Shapes, not only table keys: every kernel is compiled on a map with a side that is not a
    multiple of 16 (no 16-divisible strides to specialise on), and the gating ops at the benchmark
    shapes (CBAM, channel and spatial gate on 4×128×256², RCAN's channel gate on 16×64×64²) in bf16
    and fp32. 2×2 patches at head dims 128 and 256, window attention at head dim 128 and on a
    window-multiple map that is not a multiple of 16, and odd maps at head dims 64 and 128 in every
    attention dtype class are cases of the gate or of cr.WIDE_PENDING; those still pending are printed."""
    rows = [r for r in report["rows"] if r["arch"] == 90]
    not_odd = _jit_kernels() - {r["kernel"] for r in rows if _odd(r["size"])}
    assert not not_odd, f"kernels compiled on 16-divisible maps only: {sorted(not_odd)}"
    shapes = {(r["op"], r["dtype"], r["batch"], r["channels"], *r["size"]) for r in rows if "batch" in r}
    for dtype in ("bf16", "fp32"):
        for op in ("cbam_gate", "channel_gate", "spatial_gate"):
            assert (op, dtype, 4, 128, 256, 256) in shapes, (op, dtype)
        assert ("channel_gate", dtype, 16, 64, 64, 64) in shapes, dtype
    gate = [c for c, a in cr.gate_cases() if a == 90]
    planned = gate + cr.WIDE_PENDING
    wants = {
        "2×2 patches at head dim 128": lambda c: c.op == "attention" and c.patch > 1 and c.head_dim == 128,
        "2×2 patches at head dim 256": lambda c: c.op == "attention" and c.patch > 1 and c.head_dim == 256,
        "window attention at head dim 128": lambda c: c.op == "window_attention" and c.head_dim == 128,
        "window attention on a map not a multiple of 16": lambda c: c.op == "window_attention" and _odd(c.size),
        **{f"attention {cls} D={d} on an odd map": (
            lambda c, cls=cls, d=d: c.op == "attention" and _dtype_class(c.dtype) == cls and c.head_dim == d
            and (c.dtype == "fp32-ieee") == (cls == "ieee") and _odd(c.size))
           for cls in ("16bit", "fp32", "fp64") for d in (64, 128)},
        **{f"attention fp32-ieee D={d} on an odd map": (
            lambda c, d=d: c.op == "attention" and c.dtype == "fp32-ieee" and c.head_dim == d and _odd(c.size))
           for d in (64, 128)},
    }
    missing = [what for what, want in wants.items() if not any(want(c) for c in planned)]
    assert not missing, f"neither in the gate nor pending: {missing}"
    only_pending = [what for what, want in wants.items() if not any(want(c) for c in gate)]
    if only_pending:
        print(f"only in WIDE_PENDING so far: {only_pending}")


def test_wide_pending_cases_stay_outside_the_gate():
    """cr.WIDE_PENDING: the attention and window cases of the wide shapes whose kernels still fail
    the gate (spills), kept out of gate_cases() by name. None of them may be in the gate (a fixed
    one is moved in by deleting it from the list), each is a case of wide_cases() with the reason
    it is pending, and gating cases are never pending (they pass)."""
    gate = {c.name for c, _ in cr.gate_cases()}
    wide = {c.name for c in cr.wide_cases()}
    pending = [c.name for c in cr.WIDE_PENDING]
    assert len(set(pending)) == len(pending)
    assert not gate & set(pending), f"pending cases in the gate: {sorted(gate & set(pending))}"
    assert set(pending) <= wide, sorted(set(pending) - wide)
    assert {c.name for c in cr.gate_wide_cases(pending=False)} <= wide
    assert all(c.op in ("attention", "window_attention") for c in cr.WIDE_PENDING)
    assert set(cr.WIDE_PENDING_WHY) == set(pending) and all(cr.WIDE_PENDING_WHY.values())
    # removing a case from the list puts it in the gate: the gate's wide cases are those less the pending
    assert set(pending) <= {c.name for c in cr.gate_wide_cases(pending=False)}


def test_report_table_and_json_name_the_figures(report):
    assert report["info"]["triton"] == triton.__version__
    table = cr.format_table(report["rows"][:3])
    assert "HGMMA" in table and report["rows"][0]["kernel"] in table
    for r in report["rows"]:
        assert set(cr.FIELDS) <= set(r)
        assert r["ldg128_share"] == (round(r["ldg128"] / r["ldg"], 3) if r["ldg"] else None)
    assert "128-bit" in table.splitlines()[0]
    assert cr._share(dict(ldg=16, ldg128=12)) == "75%" and cr._share(dict(ldg=0, ldg128=0)) == "-"


def test_compare_pairs_each_part_of_a_split_launch():
    """--compare: the dV and dK launches of a split dK/dV each against their own part, or against
    the single launch of a report from before the split; the config names the chunk and the part."""
    def row(regs, stack, **config):
        return dict(arch=90, case="attention fp32 D=128 fused", kernel="_attn_bwd_dkdv_kernel",
                    config=dict(BLOCK_M=16, BLOCK_N=64, **config), num_warps=4, num_stages=2, regs=regs, stack=stack,
                    spill_stores=0, shared=16384, hgmma=12, hmma=0, ldg128=8, ldg=12, tma=0)
    one = [row(255, 816)]
    split = [row(217, 0, BLOCK_DC=16, PART=1), row(224, 0, BLOCK_DC=16, PART=2)]
    lines = cr.compare_table(one, split).splitlines()[2:]
    assert len(lines) == 2 and "w4 s2 → 16×64 w4 s2 c16 dV" in lines[0] and "255 → 217" in lines[0], lines
    assert "c16 dK" in lines[1] and "255 → 224" in lines[1] and "816 → 0" in lines[1], lines
    again = cr.compare_table(split[::-1], split).splitlines()[2:]
    assert all("→" not in line for line in again), again  # each part against itself
    assert "c16 dV" in cr.format_table(split).splitlines()[2]


def test_check_config_names_kernel_case_and_figure():
    """A launch setting known to spill (fp32 forward, 64×64 tiles, 4 warps, 2 stages, 3×TF32: the
    table's entry before the compile gate) is caught with its figures."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    code = ("from attnsr.kernels import compile_report as cr; import json; "
            "print(json.dumps(cr.check_config('fwd', 64, 'fp32', "
            "dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2), archs=(90,)))); "
            "print(json.dumps(cr.check_config('dkdv', 64, 'fp32', "
            "dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2), archs=(90,))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    (rows, failures), (n8_rows, n8_failures) = [json.loads(line) for line in proc.stdout.strip().splitlines()[-2:]]
    # 16-query tiles on two warp groups: each takes 8 of the 16 query columns, a tf32 wgmma with N = 8
    assert n8_rows[0]["wgmma_tf32_n8"] > 0, n8_rows[0]
    n8 = n8_rows[0]["wgmma_tf32_n8"]
    assert n8_failures == [f"_attn_bwd_det_kernel [attention fp32 D=64 fused det, sm_90]: {n8} "
                           "tf32 wgmma with N = 8 (m64n8k8), which reads past its shared-memory operand "
                           "(triton-lang/triton#10629): wrong results or an illegal memory access on the GPU"]
    assert [r["kernel"] for r in rows] == ["_attn_fwd_kernel"] and rows[0]["config"]["BLOCK_M"] == 64
    assert rows[0]["stack"] > 0 and rows[0]["hgmma"] > 0, rows[0]
    assert failures == [f"_attn_fwd_kernel [attention fp32 D=64 fused, sm_90]: spills: {rows[0]['stack']} B stack, "
                        f"{rows[0]['spill_stores']} spill stores"]
