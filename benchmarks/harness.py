"""One benchmark harness for every suite: cases, timing, memory, rows, JSON.

A *case* is a JSON-able dict (suite, op, provider, shape, dtype, mode, ...) so that it can be
rebuilt in a fresh subprocess to measure host memory. Each suite module (``attention``,
``gating``, ``networks``) provides ``cases(device, quick)`` and ``build(case, device)``; ``build``
returns a :class:`Bench` (the function to time plus its counted work) or raises :class:`Skip`.

Timing: CUDA uses ``triton.testing.do_bench`` (warm-up, then the median of many runs, L2 flushed
between runs); CPU runs the function a few times after one warm-up and takes the median.
Memory: CUDA reports the peak allocated bytes above what was allocated before the call; CPU
reports the peak RSS growth of one call in a fresh subprocess (the only honest host figure).
"""

import dataclasses
import datetime
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

SUITES = ("attention", "gating", "networks")


class Skip(Exception):
    """A case that is not run, with the reason (e.g. the memory it would need)."""


@dataclasses.dataclass
class Bench:
    fn: object  # () -> None, one timed call
    flops: float = 0.0  # counted floating-point operations of one call (0: not a flop-bound op)
    bytes: float = 0.0  # counted minimum bytes moved by one call (0: not a bandwidth-bound op)
    setup: object = None  # () -> None, run once before timing (e.g. allocate, warm caches)


@dataclasses.dataclass
class Row:
    suite: str
    group: str  # rows of one group compare providers on one shape, dtype and mode
    op: str
    provider: str
    shape: str
    dtype: str
    mode: str
    median_ms: float = None
    peak_mib: float = None
    tflops: float = None
    gbps: float = None
    status: str = "ok"
    speedup: dict = dataclasses.field(default_factory=dict)  # baseline provider -> its time / ours


def suite_module(name: str):
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; expected one of {', '.join(SUITES)}")
    return importlib.import_module(f"benchmarks.{name}")


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"{name} ({os.cpu_count()} cores)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from importlib.metadata import PackageNotFoundError, version

    try:
        attnsr_version = version("attnsr")
    except PackageNotFoundError:
        attnsr_version = "source"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "attnsr": attnsr_version,
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
    }


def time_ms(fn, device: torch.device, cpu_repeats: int = 3) -> float:
    """Median milliseconds of one call of ``fn`` after warm-up."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()  # warm-up
    times = []
    for _ in range(cpu_repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cuda_peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def cpu_peak_mib(case: dict, timeout: float = 900) -> float:
    """Peak RSS growth of one call of ``case`` in a fresh subprocess (Linux)."""
    # a fixed mmap threshold: large blocks are mapped and unmapped, not kept in glibc's arenas, so
    # memory freed by the warm-up call cannot hide the measured call's peak
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", "benchmarks.harness", json.dumps(case)], capture_output=True,
                         text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess failed for {case}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _measure_rss(case: dict) -> None:
    """Subprocess side of :func:`cpu_peak_mib`: build, warm up once, then one measured call.

    The kernel's high-water mark is reset after the warm-up (``5`` into /proc/self/clear_refs), so
    the figure is the measured call's own peak above the RSS it started from.
    """
    device = torch.device("cpu")
    bench = suite_module(case["suite"]).build(case, device)
    if bench.setup is not None:
        bench.setup()
    bench.fn()  # lazy initialisation (allocator pools, compiled graphs) stays off the books
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kib()
    bench.fn()
    print(json.dumps({"growth_mib": (_peak_rss_kib() - base) / 1024}))


def case_row(case: dict, status: str = "ok") -> Row:
    """A row for ``case`` with no figures yet."""
    return Row(**{k: case[k] for k in ("suite", "group", "op", "provider", "shape", "dtype", "mode")}, status=status)


def run_case(case: dict, device: torch.device, measure_memory: bool = True, cpu_repeats: int = 3) -> Row:
    row = case_row(case)
    try:
        bench = suite_module(case["suite"]).build(case, device)
    except Skip as why:
        row.status = f"skipped: {why}"
        return row
    if bench.setup is not None:
        bench.setup()
    row.median_ms = time_ms(bench.fn, device, cpu_repeats)
    if bench.flops:
        row.tflops = bench.flops / (row.median_ms * 1e-3) / 1e12
    if bench.bytes:
        row.gbps = bench.bytes / (row.median_ms * 1e-3) / 1e9
    if measure_memory:
        row.peak_mib = cuda_peak_mib(bench.fn) if device.type == "cuda" else cpu_peak_mib(case)
    del bench
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_speedups(rows: list, baselines: dict) -> None:
    """Fill ``row.speedup[b] = time(b) / time(row)`` for every baseline b measured in the same group.

    ``baselines`` maps a suite to its baseline providers (e.g. attention: naive, sdpa).
    """
    by_group = {}
    for r in rows:
        by_group.setdefault(r.group, {})[r.provider] = r
    for r in rows:
        if r.median_ms is None:
            continue
        for b in baselines.get(r.suite, ()):
            base = by_group[r.group].get(b)
            if base is not None and base is not r and base.median_ms is not None:
                r.speedup[b] = base.median_ms / r.median_ms


def write_json(rows: list, info: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    payload = {"info": info, "rows": [dataclasses.asdict(r) for r in rows]}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def memory_budget(device: torch.device) -> float:
    """Bytes a case may plan to use: 90% of free GPU memory, or 70% of the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.9 * free
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return 0.7 * int(fields["MemAvailable"].split()[0]) * 1024


if __name__ == "__main__":
    _measure_rss(json.loads(sys.argv[1]))
