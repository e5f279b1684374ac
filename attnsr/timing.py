"""Timing and memory measurement shared by ``attnsr demo`` and the benchmark suites of the source tree.

Timing: the functions compared in one table (the providers of one case) are timed *interleaved*:
after each one's warm-up, every round calls each of them once in turn, and each one's median over
the rounds is its figure (:func:`time_interleaved`). A machine that gets busier or quieter during
the measurement then slows every provider alike, and their ratio holds; timed one after the other,
a job starting halfway flips it (``make demo``'s table read ``auto`` at 1.81× the naive layer's
time with another job running, 0.23–0.32× on an idle machine). CUDA times each call with CUDA
events, L2 flushed before it, as ``triton.testing.do_bench`` does; CPU with ``time.perf_counter``.
Memory: CUDA reports the peak allocated bytes above what was allocated before the call; CPU
reports the peak RSS growth of one call in a fresh subprocess (the only honest host figure).

A measured *case* is a JSON-able dict, rebuilt in that subprocess by a *builder*: the dotted name
``"module:function"`` of a function ``(case, device) -> bench`` whose result has ``fn`` (one timed
call) and ``setup`` (None, or run once before timing).
"""

import contextlib
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


def source_commit(root: str | None = None) -> dict:
    """The git commit of the source tree this package is imported from (or of ``root``): ``{"commit":
    sha, "dirty": bool}``, dirty when ``git status`` shows changes to tracked files (untracked files
    do not count); ``{"commit": None, "dirty": None}`` when that tree is not the top of a git
    checkout (an installed wheel, even in a virtual environment inside some checkout; or no git)."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30)

    try:
        top = git("rev-parse", "--show-toplevel")
        # a wheel in a virtual environment that lives inside some checkout is not that checkout's
        if top.returncode != 0 or os.path.realpath(top.stdout.strip()) != os.path.realpath(root):
            return {"commit": None, "dirty": None}
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if head.returncode != 0 or status.returncode != 0:  # e.g. a repository with no commit yet
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def device_info(device: torch.device) -> dict:
    """Device name, the versions a result depends on and the source commit measured (see
    :func:`source_commit`), for a JSON row or a printed table."""
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
        "threads": torch.get_num_threads() if device.type == "cpu" else None,  # PyTorch's intra-op threads
        **source_commit(),
    }
    try:  # the published blocks some suites measure come from spandrel when it is installed
        info["spandrel"] = version("spandrel")
    except PackageNotFoundError:
        pass
    return info


def busy_cores(interval: float = 0.25) -> float | None:
    """How many cores other processes keep busy: the CPU time /proc/stat counts over ``interval``
    seconds, less this process's own (it sleeps, but threads of its own may still spin), in cores;
    None where there is no /proc/stat."""
    def sample():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        own = os.times()
        return sum(ticks), ticks[3] + ticks[4], own.user + own.system, time.monotonic()

    try:
        total0, idle0, own0, wall0 = sample()
        time.sleep(interval)
        total1, idle1, own1, wall1 = sample()
    except (OSError, ValueError):
        return None
    everyone = (1 - (idle1 - idle0) / max(1, total1 - total0)) * (os.cpu_count() or 1)
    return max(0.0, everyone - (own1 - own0) / (wall1 - wall0))


@contextlib.contextmanager
def threads_on_free_cores(device: torch.device):
    """On a CPU, PyTorch's intra-op threads limited to the cores other processes leave free, for the
    block (restored after); yields ``(threads, busy cores)``, ``(None, None)`` on a GPU.

    Timed beside another job, PyTorch's threads wait on each other in every parallel region, and
    the code with the most regions loses most: on 2 cores with one kept busy, SDPA's forward +
    backward of a 64×64 map took 5.9× the naive layer's time with 2 threads and 0.30× with one
    (0.23–0.32× on an idle machine); timing the providers interleaved does not undo that.
    """
    if device.type != "cpu":
        yield None, None
        return
    before = torch.get_num_threads()
    busy = busy_cores()
    threads = before if busy is None else max(1, min(before, (os.cpu_count() or 1) - round(busy)))
    torch.set_num_threads(threads)
    try:
        yield threads, busy
    finally:
        torch.set_num_threads(before)


def time_ms(fn, device: torch.device, cpu_repeats: int = 3) -> float:
    """Median milliseconds of one call of ``fn`` after warm-up (:func:`time_interleaved` of one)."""
    return time_interleaved({"fn": fn}, device, cpu_repeats)["fn"]


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """A buffer larger than any GPU's L2 (256 MiB, as triton.testing.do_bench's): zeroing it evicts
    the previous call's data."""
    return torch.empty(256 * 2**20, dtype=torch.int8, device=device)


def _rotated(names: list, r: int) -> list:
    """Round ``r``'s order: the names starting at the r-th (no function always follows the same one)."""
    k = r % len(names)
    return names[k:] + names[:k]


def time_interleaved(fns: dict, device: torch.device, cpu_repeats: int = 3, *, warmup_ms: float = 25.0,
                     rep_ms: float = 200.0, min_rounds: int = 5, max_rounds: int = 1000,
                     errors: dict | None = None) -> dict:
    """Median milliseconds of one call of each of ``fns`` (name -> ``() -> None``), timed round-robin.

    Each function is warmed up on its own first; then each round calls every function once, in
    turn, round r starting at the r-th function (rotated, so that none always runs after the same
    neighbour), and each function's median over the rounds is returned, by name.

    - CUDA: a call is timed by CUDA events recorded around it, with L2 flushed before it (a 256 MiB
      buffer zeroed, outside the events); warm-up: one call, one or five to estimate its time, then
      about ``warmup_ms`` of calls; rounds: enough for all functions together to take about ``rep_ms`` per
      function, at least ``min_rounds``, at most ``max_rounds`` (a slow provider means fewer rounds).
    - CPU: one warm-up call each, then ``cpu_repeats`` rounds timed with ``time.perf_counter``.

    ``errors``: None, an exception propagates; a dict, a function that raises is left out of the
    remaining rounds and of the result, and its exception is stored there under its name.
    """
    fns = dict(fns)
    cuda = device.type == "cuda"

    def call(name, fn=None) -> bool:  # False: the function raised and was dropped
        try:
            (fn or fns[name])()
            return True
        except Exception as error:
            if errors is None:
                raise
            errors[name] = error
            del fns[name]
            return False

    if cuda:
        flush = _l2_flush_buffer(device)
        estimate = {}
        for name, fn in list(fns.items()):
            def warm(fn=fn, name=name):
                fn()  # first call: compiles, autotunes, allocates
                for calls in (1, 5):  # a slow call is estimated from one, a fast one from five
                    torch.cuda.synchronize(device)
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(calls):
                        flush.zero_()
                        fn()
                    end.record()
                    torch.cuda.synchronize(device)
                    estimate[name] = max(start.elapsed_time(end) / calls, 1e-4)
                    if estimate[name] > 10:
                        break
                for _ in range(int(warmup_ms / estimate[name])):
                    fn()

            call(name, warm)
        if not fns:
            return {}
        total = sum(estimate[name] for name in fns)
        rounds = min(max_rounds, max(min_rounds, int(rep_ms * len(fns) / total)))
        times = {name: [] for name in fns}
        for r in range(rounds):
            for name in _rotated(list(fns), r):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                flush.zero_()
                start.record()
                if call(name):
                    end.record()
                    times[name].append((start, end))
        torch.cuda.synchronize(device)
        return {name: statistics.median(s.elapsed_time(e) for s, e in times[name]) for name in fns}
    for name in list(fns):
        call(name)
    times = {name: [] for name in fns}
    for r in range(cpu_repeats if fns else 0):
        for name in _rotated(list(fns), r):
            start = time.perf_counter()
            if call(name):
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(times[name]) for name in fns}


def cuda_peak_mib(fn) -> float:
    """Peak CUDA memory allocated by one call of ``fn`` above what was allocated before it, MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cuda_kernels_per_call(fn) -> int:
    """GPU activities (kernels, memsets, copies) one call of ``fn`` runs, counted by torch.profiler's
    CUDA activity trace after one warm-up call (compiled kernels and cached buffers then exist):
    what a call costs in launches, whoever makes them (Triton, ATen, Inductor, cuBLAS)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


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
