"""Run benchmark suites, print one table with ratios, write JSON, draw plots, update docs/benchmarks.md.

    python -m benchmarks.report                       # every suite on this device
    python -m benchmarks.report --suite attention --quick
    python -m benchmarks.report --plot benchmarks/results/<file>.json
    python -m benchmarks.report --table benchmarks/results/<file>.json    # print its table again
    python -m benchmarks.report --readme benchmarks/results/<file>.json [...]   # regenerate docs/benchmarks.md tables

Rows go to ``benchmarks/results/<device>-<date>.json`` (rows of suites not run now are kept when
the file exists), plots next to it as ``<device>-<date>-<suite>-<what>.png``.
"""

import argparse
import gc
import json
import os
import re
import sys
import time
import traceback

import torch

from benchmarks import harness

BASELINES = {"attention": ("naive", "sdpa"), "gating": ("eager", "compile"), "networks": ("naive", "torch"),
             "window": ("naive", "sdpa", "flex"), "models": ("eager",),
             "transposed": ("eager", "compile")}
# suites whose rows also carry peak memory ÷ each baseline's (the window blocks' headline is memory, and
# the transposed attention's target is a peak-memory ratio too; a
# CPU's models rows are for memory)
MEMORY_RATIOS = ("window", "models", "transposed")
KEPT_INFO = ("commit", "dirty", "date", "torch", "triton", "fwd_bwd_flops", "kept")  # of an earlier run's rows
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
README = os.path.join(os.path.dirname(RESULTS), "..", "docs", "benchmarks.md")  # the page holding the tables


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _fmt(value, spec, empty="-"):
    return empty if value is None else format(value, spec)


def print_table(rows, file=None) -> None:
    file = file or sys.stdout  # looked up per call, so a redirected stdout is honoured
    group = None
    for r in rows:
        if r["group"] != group:
            group = r["group"]
            print(f"\n{group}", file=file)
            header = f"  {'provider':<9} {'median ms':>10} {'peak MiB':>9} {'TFLOP/s':>8} {'GB/s':>7}  speed-up"
            print(header, file=file)
        if r["status"] != "ok":
            print(f"  {r['provider']:<9} {r['status']}", file=file)
            continue
        ratios = ", ".join([f"{v:.2f}x vs {k}" for k, v in r["speedup"].items()]
                           + [f"mem {v:.2f}x of {k}" for k, v in r.get("memory_ratio", {}).items()]
                           + ([f"{r['kernels']} GPU kernels"] if r.get("kernels") is not None else [])
                           + ([r["note"]] if r.get("note") else []))
        print(f"  {r['provider']:<9} {_fmt(r['median_ms'], '10.3f'):>10} {_fmt(r['peak_mib'], '9.1f'):>9} "
              f"{_fmt(r['tflops'], '8.2f'):>8} {_fmt(r['gbps'], '7.1f'):>7}  {ratios}", file=file)


# headline cases run in this order of suites: the attention targets, then the network step, the
# window blocks' training-step memory, then the gating (whose torch.compile baseline takes longest
# to build), then the whole published models (their compiled baseline takes minutes)
HEADLINE_ORDER = ("attention", "networks", "window", "gating", "transposed", "models")


def _todo(suites, device, quick: bool, headline_first: bool) -> list:
    todo = [case for suite in suites for case in harness.suite_module(suite).cases(device, quick)]
    if headline_first:  # stable: within a suite the order stays; headline() is per group, not provider
        def rank(case):
            if harness.suite_module(case["suite"]).headline(case):
                return HEADLINE_ORDER.index(case["suite"])
            return len(HEADLINE_ORDER)

        todo.sort(key=rank)
    return todo


def _free_device_memory(device: torch.device) -> None:
    """Return what a failed case left to the allocator, so the next case's memory budget is true."""
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError as error:  # a sticky CUDA error: the following cases will fail and say so
            print(f"empty_cache failed: {error}", file=sys.stderr)


def run(suites, quick: bool, memory: bool, out=None, cpu_repeats: int = 3, budget_s=None,
        headline_first: bool = False) -> str:
    """Run the cases of ``suites``; write the JSON after every case, so an interrupted run keeps
    what it measured. The providers of a group are timed interleaved (:func:`harness.interleaved`).
    A case that raises becomes a ``failed: ...`` row (traceback on stderr). With
    ``budget_s``, no group of cases (the providers compared on one shape) starts once that many
    seconds have passed; a group already started is finished, and the rest are recorded as
    skipped. ``headline_first`` runs the cases behind the README's headline figures first."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = dict(harness.device_info(device), fwd_bwd_flops=harness.FWD_BWD_FLOPS)
    path = out or os.path.join(RESULTS, f"{_slug(info['device'])}-{info['date']}.json")
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        kept = [harness.Row(**r) for r in old["rows"] if r["suite"] not in suites]
        if kept:  # those rows were measured by an earlier run: say which
            info["kept"] = {"suites": sorted({r.suite for r in kept}),
                            **{k: old["info"].get(k) for k in KEPT_INFO if k in old["info"]}}
    todo = _todo(suites, device, quick, headline_first)
    groups = []  # the cases of each group, in order (a group's providers are adjacent in todo)
    for case in todo:
        if not groups or groups[-1][0]["group"] != case["group"]:
            groups.append([])
        groups[-1].append(case)
    rows = []
    start = time.monotonic()
    i = 0
    for members in groups:
        spent = budget_s is not None and time.monotonic() - start >= budget_s
        with harness.interleaved(members, device, cpu_repeats):  # the group's providers timed round-robin
            for case in members:
                i += 1
                print(f"[{i}/{len(todo)}] {case['group']} :: {case['provider']}", file=sys.stderr, flush=True)
                if spent:
                    row = harness.case_row(case, f"skipped: the run's time budget of {budget_s:g} s was spent")
                else:
                    row = _run_one(case, device, memory, cpu_repeats)
                rows.append(row)
                harness.add_speedups(rows, BASELINES, MEMORY_RATIOS)
                harness.write_json(kept + rows, info, path)
    print_results(info, rows)
    print(f"rows written to {path}")
    return path


def _run_one(case: dict, device: torch.device, memory: bool, cpu_repeats: int):
    """One case's row; a case that raises becomes a ``failed: ...`` row (traceback on stderr)."""
    failure = None
    try:
        return harness.run_case(case, device, measure_memory=memory, cpu_repeats=cpu_repeats)
    except Exception as error:  # one broken case must not lose the others' figures
        traceback.print_exc()
        first = (str(error).strip().splitlines() or [""])[0][:200]
        failure = f"failed: {type(error).__name__}: {first}"
    # outside the handler: the traceback no longer holds the case's tensors
    _free_device_memory(device)
    return harness.case_row(case, failure)


def print_results(info: dict, rows: list, ran_only: bool = False) -> None:
    """The device line, the table (``ran_only``: without the groups the time budget cut) and the
    per-suite count of ok, skipped and failed rows."""
    shown = {r.group for r in rows if not ran_only or "time budget" not in r.status}
    print(f"device: {info.get('device')}  torch {info.get('torch')}  triton {info.get('triton')}  "
          f"date {info.get('date')}")
    print_table([vars(r) for r in rows if r.group in shown])
    print(status_counts(rows))


def status_counts(rows) -> str:
    """One line: per suite, how many rows are ok, skipped and failed."""
    counts = {}
    for r in rows:
        kind = r.status.split(":")[0]
        counts.setdefault(r.suite, {}).setdefault(kind, 0)
        counts[r.suite][kind] += 1
    return "cases: " + "; ".join(f"{suite} " + ", ".join(f"{n} {kind}" for kind, n in sorted(c.items()))
                                 for suite, c in counts.items())


def plot(path: str, required: bool = True) -> list:
    """Time and memory versus map size, one line per provider, per (suite, op, mode, dtype, variant).

    Without matplotlib: an error if ``required`` (``--plot``), else a note and no plots (after a run,
    whose JSON is already written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        message = "plotting needs matplotlib: pip install -e '.[bench]'"
        if required:
            raise SystemExit(message) from None
        print(f"no plots: {message}", file=sys.stderr)
        return []
    with open(path) as f:
        payload = json.load(f)
    info, rows = payload["info"], payload["rows"]
    series = {}
    for r in rows:
        size = _map_size(r["shape"])
        if r["status"] != "ok" or size is None or r["median_ms"] is None:  # memory-only rows: no time to plot
            continue
        variant = re.sub(r"^\d+x\d+x\d+x\d+ ?", "", r["shape"]) or "-"
        if r["suite"] == "attention":  # the channels set the head dim: one line per C
            variant = f"C{r['shape'].split('x')[1]}" + ("" if variant == "-" else f" {variant}")
        key = (r["suite"], r["op"], r["mode"], r["dtype"], variant)
        series.setdefault(key, {}).setdefault(r["provider"], []).append((size, r["median_ms"], r["peak_mib"]))
    written = []
    stem = os.path.splitext(path)[0]
    for suite in sorted({k[0] for k in series}):
        keys = [k for k in series if k[0] == suite and len({p[0] for v in series[k].values() for p in v}) > 1]
        if not keys:
            continue
        fig, axes = plt.subplots(len(keys), 2, figsize=(10, 3.2 * len(keys)), squeeze=False)
        for (ax_t, ax_m), key in zip(axes, keys):
            for provider, points in sorted(series[key].items()):
                points.sort()
                xs = [p[0] for p in points]
                ax_t.plot(xs, [p[1] for p in points], marker="o", label=provider)
                if all(p[2] is not None for p in points):
                    ax_m.plot(xs, [p[2] for p in points], marker="o", label=provider)
            title = " ".join(k for k in key[1:] if k != "-")
            for ax, what in ((ax_t, "median time (ms)"), (ax_m, "peak memory (MiB)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("map size (pixels per side)")
                ax.set_ylabel(what)
                ax.set_title(title, fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8)
        fig.suptitle(f"{suite}: {info['device']}, torch {info['torch']}, triton {info['triton']}, {info['date']}",
                     fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        out = f"{stem}-{suite}.png"
        fig.savefig(out, dpi=90)
        plt.close(fig)
        written.append(out)
    return written


def _map_size(shape: str):
    m = re.match(r"\d+x\d+x(\d+)x(\d+)", shape)
    return int(m.group(1)) if m else None


def _suites_in(path: str) -> set:
    """The suites of which a results file holds at least one measured row."""
    with open(path) as f:
        return {r["suite"] for r in json.load(f)["rows"] if r["status"] == "ok"}


def markdown(path: str, suites=None) -> str:
    """The README's tables for one results file (``suites`` of it, default all): one line per
    group, times and ratios. Groups the run's time budget cut (every row skipped for it) are left
    out and counted in a line."""
    with open(path) as f:
        payload = json.load(f)
    info, rows = payload["info"], [r for r in payload["rows"] if suites is None or r["suite"] in suites]
    cut = {r["group"] for r in rows} - {r["group"] for r in rows if "time budget" not in r["status"]}
    rows = [r for r in rows if r["group"] not in cut]
    lines = [f"Measured on **{info['device']}**, torch {info['torch']}, triton {info['triton']}, "
             f"{info['date']} (`{os.path.relpath(path, os.path.dirname(README))}`)"
             + (f"; {len(cut)} groups the run's time budget did not reach are in the JSON only." if cut else "."),
             ""]
    for suite in harness.SUITES:
        groups = {}
        for r in rows:
            if r["suite"] == suite:
                groups.setdefault(r["group"], []).append(r)
        if not groups:
            continue
        providers = []
        for rs in groups.values():
            for r in rs:
                if r["provider"] not in providers:
                    providers.append(r["provider"])
        lines.append(f"**{suite}** (median ms / peak MiB; ratio = baseline time ÷ this time)")
        lines.append("")
        lines.append("| case | " + " | ".join(providers) + " | ratios |")
        lines.append("|---" * (len(providers) + 2) + "|")
        for group, rs in groups.items():
            by = {r["provider"]: r for r in rs}
            cells = []
            for p in providers:
                r = by.get(p)
                if r is None:
                    cells.append("")
                elif r["status"] != "ok":
                    status = "not run" if "GPU" in r["status"] else r["status"].replace("skipped: ", "skip: ")
                    cells.append(status.replace("|", "\\|"))
                else:
                    time_ms = "time not measured" if r["median_ms"] is None else f"{r['median_ms']:.2f} ms"
                    cells.append(f"{time_ms} / {_fmt(r['peak_mib'], '.0f')} MiB")
            first = BASELINES.get(suite, ("",))[0]  # naive / eager: every other provider vs it and vs the rest
            ratios = "; ".join([f"{r['provider']} {v:.2f}x vs {k}" for r in rs for k, v in r["speedup"].items()
                                if r["provider"] != first]
                               + [f"{r['provider']} memory {v:.2f}x of {k}" for r in rs
                                  for k, v in r.get("memory_ratio", {}).items() if r["provider"] != first])
            lines.append(f"| {group} | " + " | ".join(cells) + f" | {ratios} |")
        lines.append("")
        png = f"{os.path.splitext(path)[0]}-{suite}.png"
        if os.path.exists(png):
            rel = os.path.relpath(png, os.path.dirname(README))
            lines.append(f"![{suite}: time and memory versus map size]({rel})")
            lines.append("")
    return "\n".join(lines)


def update_readme(paths) -> None:
    """Regenerate the README's performance section from one or more results files, in order; a
    suite measured in several files (at least one row that ran) is taken from the last of them."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    owned = [_suites_in(p) - set().union(*map(_suites_in, paths[i + 1:])) for i, p in enumerate(paths)]
    with open(README) as f:
        text = f.read()
    begin, end = "<!-- performance: begin -->", "<!-- performance: end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"README has no {begin} ... {end} section to update")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    command = " ".join(os.path.relpath(p) for p in paths)
    generated = f"{begin}\n<!-- generated by: python -m benchmarks.report --readme {command} -->\n"
    with open(README + ".tmp", "w") as f:
        f.write(head + generated + "\n".join(markdown(p, o) for p, o in zip(paths, owned) if o) + "\n" + end + tail)
    os.replace(README + ".tmp", README)


def main(argv=None, prog=None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", action="append", choices=harness.SUITES,
                        help="suite to run (repeatable; default: all)")
    parser.add_argument("--quick", action="store_true", help="a small subset of each suite")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case on CPU (median)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no group of cases after this many seconds (a started group is finished); "
                             "the rest are recorded as skipped")
    parser.add_argument("--headline-first", action="store_true",
                        help="run the cases behind the headline figures (the issues' targets) first")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/<device>-<date>.json)")
    parser.add_argument("--plot", metavar="JSON", help="only draw the plots of an existing results file")
    parser.add_argument("--table", metavar="JSON",
                        help="only print the table of an existing results file (groups the budget cut: counted)")
    parser.add_argument("--readme", metavar="JSON", nargs="+",
                        help="only regenerate the README performance tables, from these results files in order")
    args = parser.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            payload = json.load(f)
        print_results(payload["info"], [harness.Row(**r) for r in payload["rows"]], ran_only=True)
        return 0
    if args.plot:
        print("\n".join(plot(args.plot)))
        return 0
    if args.readme:
        update_readme(args.readme)
        print(f"README performance section regenerated from {', '.join(args.readme)}")
        return 0
    path = run(args.suite or list(harness.SUITES), args.quick, not args.no_memory, args.out, args.repeats,
               args.budget_s, args.headline_first)
    for png in plot(path, required=False):
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
