"""benchmarks.report's plumbing: case order, the time budget, a failing case, incremental JSON.

No case is timed here (timings belong to benchmarks): run_case is replaced where a row is needed.
"""

import json

import torch

from benchmarks import harness, report

GPU = torch.device("cuda")  # only its type is read: the suites' GPU case lists, built without a GPU


def _fake_row(case, device, measure_memory=True, cpu_repeats=3):
    row = harness.case_row(case)
    row.median_ms = {"eager": 4.0, "compile": 2.0, "fused": 1.0}.get(case["provider"], 3.0)
    return row


def test_headline_cases_run_first_and_groups_stay_whole():
    todo = report._todo(harness.SUITES, GPU, quick=False, headline_first=True)
    flags = [harness.suite_module(c["suite"]).headline(c) for c in todo]
    first_rest = flags.index(False)
    assert first_rest > 0 and not any(flags[first_rest:]), "headline cases must all come first"
    headline = {(c["suite"], c["op"], c["dtype"]) for c, f in zip(todo, flags) if f}
    assert ("attention", "image_attention", "bfloat16") in headline
    assert ("gating", "cbam_gate", "bfloat16") in headline
    assert ("networks", "ImageInpaintingModel", "bfloat16") in headline
    assert ("window", "HAB", "bfloat16") in headline
    assert any(c["shape"] == "8x4x256x256 b8" for c in todo), "the batch-8 training-step target is missing"
    seen, previous = set(), None
    for c in todo:  # every group's providers are adjacent, so the table compares them side by side
        if c["group"] != previous:
            assert c["group"] not in seen, f"group {c['group']} is split"
            seen.add(c["group"])
            previous = c["group"]
    assert len(todo) == len(report._todo(harness.SUITES, GPU, quick=False, headline_first=False))
    order = [c["suite"] for c, f in zip(todo, flags) if f]
    assert order == sorted(order, key=report.HEADLINE_ORDER.index), "headline suites out of priority order"


def test_budget_is_checked_per_group_and_other_suites_rows_are_kept(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    other = harness.case_row({"suite": "attention", "group": "g", "op": "op", "provider": "naive", "shape": "s",
                              "dtype": "float32", "mode": "fwd"})
    harness.write_json([other], {"device": "d"}, str(out))
    clock = iter(range(1000))  # every reading one second later
    monkeypatch.setattr(report.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(harness, "run_case", _fake_row)
    report.run(["gating"], quick=True, memory=False, out=str(out), budget_s=1.5)
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["suite"] == "attention", "the rows of suites not run now must be kept"
    gating = rows[1:]
    first = [r for r in gating if r["group"] == gating[0]["group"]]
    assert len(first) == 3 and all(r["status"] == "ok" for r in first), "a started group must be finished"
    rest = [r for r in gating if r["group"] != gating[0]["group"]]
    assert rest and all(r["status"].startswith("skipped: the run's time budget") for r in rest)


def test_spent_budget_records_every_case_as_skipped(tmp_path):
    out = tmp_path / "r.json"
    report.run(["gating"], quick=True, memory=False, out=str(out), budget_s=0)
    rows = json.loads(out.read_text())["rows"]
    assert rows and len(rows) == len(harness.suite_module("gating").cases(torch.device("cpu"), True))
    assert all(r["status"].startswith("skipped: the run's time budget of 0 s was spent") for r in rows)


def test_a_failing_case_is_a_row_and_the_others_are_kept(tmp_path, monkeypatch):
    def run_case(case, device, measure_memory=True, cpu_repeats=3):
        if case["provider"] == "compile":
            raise RuntimeError("boom\nsecond line")
        return _fake_row(case, device)

    written = []
    real_write = harness.write_json

    def write_json(rows, info, path):  # the JSON is rewritten after every case
        written.append(len(rows))
        real_write(rows, info, path)

    monkeypatch.setattr(harness, "run_case", run_case)
    monkeypatch.setattr(harness, "write_json", write_json)
    out = tmp_path / "r.json"
    report.run(["gating"], quick=True, memory=False, out=str(out))
    rows = json.loads(out.read_text())["rows"]
    n = len(rows)
    assert written == list(range(1, n + 1))
    failed = [r for r in rows if r["provider"] == "compile"]
    assert failed and all(r["status"] == "failed: RuntimeError: boom" for r in failed)
    eager = [r for r in rows if r["provider"] == "eager"]
    assert eager and all(r["status"] == "ok" and r["speedup"] == {} for r in eager)
    fused = [r for r in rows if r["provider"] == "fused"]
    assert fused and all(r["speedup"] == {"eager": 4.0} for r in fused), "ratios against the baseline that ran"


def test_readme_section_takes_each_suite_from_the_last_file_that_has_it(tmp_path, monkeypatch):
    def results(name, date, suites):
        rows = []
        for suite in suites:
            case = {"suite": suite, "group": f"{suite} case", "op": "op", "provider": report.BASELINES[suite][0],
                    "shape": "1x1x8x8", "dtype": "float32", "mode": "fwd"}
            rows.append(_fake_row(case, None))
        info = {"device": name, "torch": "t", "triton": "tr", "date": date}
        path = tmp_path / f"{name}.json"
        harness.write_json(rows, info, str(path))
        return str(path)

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- performance: begin -->\nold\n<!-- performance: end -->\nafter\n")
    monkeypatch.setattr(report, "README", str(readme))
    older = results("cpu-a", "2026-01-01", ["attention", "gating"])
    newer = results("cpu-b", "2026-02-02", ["gating"])
    report.update_readme([older, newer])
    text = readme.read_text()
    assert text.startswith("intro\n<!-- performance: begin -->") and text.endswith("<!-- performance: end -->\nafter\n")
    assert "old" not in text
    a, b = text.index("Measured on **cpu-a**"), text.index("Measured on **cpu-b**")
    assert a < text.index("| attention case |") < b < text.index("| gating case |")
    assert text.count("| gating case |") == 1, "gating must come from the newer file only"


def test_table_prints_a_results_file_again(tmp_path, capsys):
    rows = [_fake_row({"suite": "gating", "group": "cbam_gate fwd g", "op": "cbam_gate", "provider": p,
                       "shape": "1x2x3x4", "dtype": "float32", "mode": "fwd"}, None) for p in ("eager", "fused")]
    harness.add_speedups(rows, report.BASELINES)
    path = tmp_path / "r.json"
    harness.write_json(rows, {"device": "dev", "torch": "t", "triton": "tr", "date": "d"}, str(path))
    assert report.main(["--table", str(path)]) == 0
    out = capsys.readouterr().out
    assert "device: dev" in out and "cbam_gate fwd g" in out and "4.00x vs eager" in out
    assert out.strip().endswith("cases: gating 2 ok")


def test_an_interpreted_case_is_measured_for_memory_only_with_the_interpreter(tmp_path, monkeypatch, capsys):
    """The window suite's fused block on CPU: never built in this process, its peak memory measured
    in a subprocess whose environment sets TRITON_INTERPRET=1; no time, a note saying why."""
    calls = []

    def cpu_peak_mib(case, builder, pythonpath="", timeout=900, env=None):
        calls.append((case["provider"], env))
        return {"naive": 40.0, "sdpa": 20.0}.get(case["provider"], 10.0)

    monkeypatch.setattr(harness.timing, "cpu_peak_mib", cpu_peak_mib)
    monkeypatch.setattr(harness, "time_ms", lambda fn, device, repeats: 3.0)
    cpu = torch.device("cpu")
    group = [c for c in harness.suite_module("window").cases(cpu, quick=True) if c["op"] == "HAB"]
    assert [c["provider"] for c in group] == ["naive", "sdpa", "attnsr"] and group[-1]["interpret"]
    assert "window" in harness.SUITES and "window" in report.HEADLINE_ORDER
    rows = [harness.run_case(c, cpu) for c in group]
    harness.add_speedups(rows, report.BASELINES, report.MEMORY_RATIOS)
    fused = rows[-1]
    assert calls == [("naive", None), ("sdpa", None), ("attnsr", {"TRITON_INTERPRET": "1"})]
    assert fused.status == "ok" and fused.median_ms is None and fused.peak_mib == 10.0
    assert fused.note == harness.INTERPRETED and fused.speedup == {}
    assert fused.memory_ratio == {"naive": 0.25, "sdpa": 0.5}
    skipped = harness.run_case(group[-1], cpu, measure_memory=False)
    assert skipped.status.startswith("skipped: a memory-only case") and len(calls) == 3
    report.print_table([vars(r) for r in rows])
    table = capsys.readouterr().out
    assert "mem 0.25x of naive, mem 0.50x of sdpa, " + harness.INTERPRETED in table
    path = tmp_path / "r.json"
    harness.write_json(rows, {"device": "dev", "torch": "t", "triton": "tr", "date": "d"}, str(path))
    text = report.markdown(str(path))
    assert "| time not measured / 10 MiB |" in text and "attnsr memory 0.25x of naive" in text


def test_readme_tables_leave_out_the_groups_the_time_budget_cut(tmp_path):
    """A budget-limited GPU run records the groups it did not reach as skipped; the README shows the
    groups that ran and says how many were cut."""
    def row(group, provider, status, ms=None):
        return {"suite": "attention", "group": group, "provider": provider, "status": status, "median_ms": ms,
                "peak_mib": 1.0 if ms else None, "speedup": {}, "memory_ratio": {}}

    cut = "skipped: the run's time budget of 90 s was spent"
    rows = [row("ran", "naive", "ok", 2.0), row("ran", "attnsr", "ok", 1.0),
            row("cut a", "naive", cut), row("cut a", "attnsr", cut), row("cut b", "naive", cut)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"info": {"device": "dev", "torch": "t", "triton": "tr", "date": "d"}, "rows": rows}))
    text = report.markdown(str(path))
    assert "| ran | 2.00 ms / 1 MiB | 1.00 ms / 1 MiB |" in text
    assert "cut a" not in text and "cut b" not in text
    assert "2 groups the run's time budget did not reach are in the JSON only." in text
