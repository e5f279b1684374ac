"""Timing and memory measurement shared by ``attnsr demo`` and the benchmark suites of the source tree.

Timing: CUDA uses ``triton.testing.do_bench`` (warm-up, then the median of many runs, L2 flushed
between runs); CPU runs the function a few times after one warm-up and takes the median.
Memory: CUDA reports the peak allocated bytes above what was allocated before the call; CPU
reports the peak RSS growth of one call in a fresh subprocess (the only honest host figure).

A measured *case* is a JSON-able dict, rebuilt in that subprocess by a *builder*: the dotted name
``"module:function"`` of a function ``(case, device) -> bench`` whose result has ``fn`` (one timed
call) and ``setup`` (None, or run once before timing).
"""

import datetime
import gc
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


def device_info(device: torch.device) -> dict:
    """Device name and the versions a result depends on, for a JSON row or a printed table."""
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
    info = {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "attnsr": attnsr_version,
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
    }
    try:  # the published blocks some suites measure come from spandrel when it is installed
        info["spandrel"] = version("spandrel")
    except PackageNotFoundError:
        pass
    return info


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
    """Peak CUDA memory allocated by one call of ``fn`` above what was allocated before it, MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def cpu_peak_mib(case: dict, builder: str, pythonpath: str = "", timeout: float = 900,
                 env: dict | None = None) -> float:
    """Peak RSS growth of one call of ``case`` (rebuilt by ``builder``) in a fresh subprocess (Linux).

    ``pythonpath`` is prepended to the subprocess's PYTHONPATH (the source tree, for builders that
    live outside the installed package); ``env`` adds variables to its environment (e.g.
    ``TRITON_INTERPRET=1``, which must be set before the subprocess imports triton).
    """
    # a fixed mmap threshold: large blocks are mapped and unmapped, not kept in glibc's arenas, so
    # memory freed by the warm-up call cannot hide the measured call's peak
    env = dict(os.environ, **(env or {}), MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", "attnsr.timing", builder, json.dumps(case)], capture_output=True,
                         text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess failed for {case}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]


def _measure_rss(builder: str, case: dict) -> None:
    """Subprocess side of :func:`cpu_peak_mib`: build, warm up once, then one measured call.

    The kernel's high-water mark is reset after the warm-up (``5`` into /proc/self/clear_refs), so
    the figure is the measured call's own peak above the RSS it started from. Python's garbage
    collector runs once before the reset: otherwise a collection inside the call frees the
    warm-up's garbage and offsets the call's own allocations (a net growth, not a peak). It stays
    on during the call, which then frees its own garbage as it would anywhere.
    """
    module, _, name = builder.partition(":")
    bench = getattr(importlib.import_module(module), name)(case, torch.device("cpu"))
    if bench.setup is not None:
        bench.setup()
    bench.fn()  # lazy initialisation (allocator pools, compiled graphs) stays off the books
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kib()
    bench.fn()
    print(json.dumps({"growth_mib": (_peak_rss_kib() - base) / 1024}))


if __name__ == "__main__":
    _measure_rss(sys.argv[1], json.loads(sys.argv[2]))
