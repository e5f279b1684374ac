"""benchmarks/launch_check.py: each case in its own process against float64; a fault, an error or
an out-of-bounds result is a row and a non-zero exit, not a lost process."""

import json

from benchmarks import launch_check


def test_cases_cover_every_table_dimension():
    names = [c["name"] for c in launch_check.cases()]
    assert len(names) == len(set(names))
    for dtype in launch_check.DTYPES:
        for d in (16, 30, 64, 108, 128, 256):
            assert f"attention {dtype} D={d}" in names
        assert f"attention {dtype} D=64 p2" in names
    assert {n for n in names if n.startswith("window fp32")} == {f"window fp32 D={d} w{w}" for d in (10, 30, 64)
                                                                 for w in (8, 16)} | {"window fp32 D=128 w8"}
    assert {n for n in names if n.startswith("transposed")} == {f"transposed {t} D={d}" for t in ("fp32", "fp16",
                                                                "bf16", "fp64") for d in (16, 48, 64, 128)}


def test_a_transposed_attention_case_runs_against_float64():
    row = launch_check.run_case({"name": "transposed fp32 D=48", "op": "transposed", "dtype": "fp32", "head_dim": 48})
    assert row["status"] == "ok" and max(row["errors"].values()) <= row["bound"], row
    assert set(row["errors"]) == {"output", "grad 0", "grad 1"}  # qkv and the temperature
    assert set(row["config"]) == {"gram", "softmax", "apply", "grad_finalize", "grad_apply"}


def test_runs_cases_in_child_processes_and_writes_rows(tmp_path, capsys):
    path = tmp_path / "rows.json"
    rc = launch_check.main(["--cases", "^attention fp32 D=30$|^window bf16 D=10 w8$", "--jobs", "2",
                            "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    data = json.loads(path.read_text())
    rows = data["rows"]
    assert data["cases"] == 2
    assert [r["name"] for r in rows] == ["attention fp32 D=30", "window bf16 D=10 w8"]
    for r in rows:
        assert r["status"] == "ok" and max(r["errors"].values()) <= r["bound"]
        assert set(r["config"]) >= {"fwd", "dkdv", "dq"}
    assert set(rows[0]["errors"]) == {"output", "grad 0"} and set(rows[1]["errors"]) == {"output", "grad 0", "grad 1"}
    assert "| attention fp32 D=30 | ok |" in out and "2 cases, 0 faulted" in out


def test_a_child_that_dies_is_a_row():
    row = launch_check.run_isolated({"name": "no such case"})
    assert row["status"] == "error" and row["error"].startswith("exit 1: ValueError"), row


def test_out_of_bounds_is_reported(monkeypatch):
    import torch

    monkeypatch.setitem(launch_check.REL_TOL, torch.float32, 0.0)
    (case,) = [c for c in launch_check.cases() if c["name"] == "attention fp32 D=16"]
    row = launch_check.run_case(case)
    assert row["status"] == "out of bounds" and row["bound"] == 0.0 and row["errors"]["output"] > 0
    assert launch_check.main(["--cases", "^nothing$"]) == 2


def test_a_nan_gradient_is_out_of_bounds(monkeypatch):
    """A kernel that reads garbage can return NaN: that is no pass (``max`` alone would skip a NaN
    that is not the first error)."""
    import math

    from attnsr import check

    rel = check.rel_error
    calls = []

    def nan_after_output(out, ref):
        calls.append(1)
        return rel(out, ref) if len(calls) == 1 else math.nan

    monkeypatch.setattr(check, "rel_error", nan_after_output)
    (case,) = [c for c in launch_check.cases() if c["name"] == "attention fp32 D=16"]
    row = launch_check.run_case(case)
    assert row["errors"]["output"] < row["bound"] and math.isnan(row["errors"]["grad 0"])
    assert row["status"] == "out of bounds"
    assert "nan (grad 0)" in launch_check.format_row(row)
