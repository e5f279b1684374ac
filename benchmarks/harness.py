"""One benchmark harness for every suite: cases, timing, memory, rows, JSON.

A *case* is a JSON-able dict (suite, op, provider, shape, dtype, mode, ...) so that it can be
rebuilt in a fresh subprocess to measure host memory. Each suite module (``attention``,
``gating``, ``networks``, ``window``, ``models``) provides ``cases(device, quick)`` and
``build(case, device)``; ``build`` returns a :class:`Bench` (the function to time plus its counted
work) or raises :class:`Skip`.

Timing and memory are measured by :mod:`attnsr.timing` (shared with ``attnsr demo``, which must
run from an installed wheel where this folder is absent). The providers of one group (one shape,
dtype and mode) are timed interleaved, round-robin (:func:`interleaved`), so that a machine whose
load changes during the run cannot flip their ratios, and on a CPU with PyTorch's threads limited
to the cores other processes leave free (:func:`attnsr.timing.threads_on_free_cores`; the rows
say so when it limited them); memory is measured per case, on its own.

FLOPs of forward + backward are counted as :data:`FWD_BWD_FLOPS` × the forward's: the backward is
2.5× the forward (dQ, dK, dV and the recomputed scores: five matrix products to the forward's two),
as FlashAttention and the Triton tutorial count, so TFLOP/s figures compare with theirs.

A case with ``"interpret": True`` runs Triton kernels on a CPU, which only Triton's interpreter can
do: it is not built or timed in this process (the interpreter's time says nothing about a GPU and
triton is already imported here without it), only its peak memory is measured, in a subprocess
with ``TRITON_INTERPRET=1``.
"""

import contextlib
import dataclasses
import importlib
import json
import os
import sys
import traceback

import torch

from attnsr import timing
from attnsr.timing import cuda_kernels_per_call, cuda_peak_mib, device_info, time_ms  # noqa: F401  (suites use harness.*)

SUITES = ("attention", "gating", "networks", "window", "models", "transposed")
FWD_BWD_FLOPS = 3.5  # forward + backward FLOPs ÷ forward FLOPs (backward = 2.5 × forward)
INTERPRETED = "memory only: Triton's interpreter on CPU (its time says nothing about a GPU)"


class Skip(Exception):
    """A case that is not run, with the reason (e.g. the memory it would need)."""


@dataclasses.dataclass
class Bench:
    fn: object  # () -> None, one timed call
    flops: float = 0.0  # counted floating-point operations of one call (0: not a flop-bound op)
    bytes: float = 0.0  # counted minimum bytes moved by one call (0: not a bandwidth-bound op)
    setup: object = None  # () -> None, run once before timing (e.g. allocate, warm caches)
    note: str = None  # what a reader of the row must know (e.g. which layers a swap replaced)


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
    memory_ratio: dict = dataclasses.field(default_factory=dict)  # baseline provider -> our peak / its peak
    note: str = None  # what a reader must know about the figures (e.g. memory measured, time not)
    kernels: int = None  # GPU kernels and memory operations one call runs (CUDA only; torch.profiler)


def suite_module(name: str):
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; expected one of {', '.join(SUITES)}")
    return importlib.import_module(f"benchmarks.{name}")


def build_case(case: dict, device: torch.device) -> Bench:
    """The builder of every suite's cases (for :func:`attnsr.timing.cpu_peak_mib`)."""
    return suite_module(case["suite"]).build(case, device)


def cpu_peak_mib(case: dict, timeout: float = 900) -> float:
    """Peak RSS growth of one call of ``case`` in a fresh subprocess that imports this source tree
    (with Triton's interpreter for an ``interpret`` case)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"TRITON_INTERPRET": "1"} if case.get("interpret") else None
    return timing.cpu_peak_mib(case, "benchmarks.harness:build_case", pythonpath=root, timeout=timeout, env=env)


def case_row(case: dict, status: str = "ok") -> Row:
    """A row for ``case`` with no figures yet."""
    return Row(**{k: case[k] for k in ("suite", "group", "op", "provider", "shape", "dtype", "mode")}, status=status)


class _Group:
    """The providers of one group: built together and timed round-robin when the first of them is
    run (:func:`run_case`), then handed out one by one (each bench freed after its row)."""

    def __init__(self, cases: list, device: torch.device, cpu_repeats: int):
        self.cases = {c["provider"]: c for c in cases if not c.get("interpret")}  # interpreted: memory only
        self.device, self.cpu_repeats = device, cpu_repeats
        self.outcomes = None  # provider -> (Bench, median ms, note) or the exception its build or timing raised

    def holds(self, case: dict) -> bool:
        return self.cases.get(case["provider"]) is case

    def take(self, case: dict):
        """(bench, median ms, a note on the timing or None) of ``case``; raises what its build or
        timing raised (:class:`Skip` too)."""
        if self.outcomes is None:
            self.outcomes = self._measure()
        outcome = self.outcomes.pop(case["provider"])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _measure(self) -> dict:
        outcomes, benches = {}, {}
        for provider, case in self.cases.items():
            try:
                benches[provider] = suite_module(case["suite"]).build(case, self.device)
                if benches[provider].setup is not None:
                    benches[provider].setup()
            except Exception as error:
                outcomes[provider] = _kept(error, case)
                benches.pop(provider, None)
        errors = {}
        with timing.threads_on_free_cores(self.device) as (threads, busy):
            times = timing.time_interleaved({p: b.fn for p, b in benches.items()}, self.device, self.cpu_repeats,
                                            errors=errors)
        note = None
        if threads is not None and threads < torch.get_num_threads():
            note = (f"timed with {threads} of {torch.get_num_threads()} threads: other processes kept {busy:.1f} "
                    "cores busy")
        for provider, error in errors.items():
            outcomes[provider] = _kept(error, self.cases[provider])
        for provider, bench in benches.items():
            if provider in times:
                outcomes[provider] = (bench, times[provider], note)
        return outcomes


def _kept(error: BaseException, case: dict) -> BaseException:
    """``error`` to be raised again later: its traceback printed now (a :class:`Skip` has none worth
    printing) and dropped, so that its frames do not hold the case's tensors while the others run."""
    if not isinstance(error, Skip):
        print(f"{case['group']} :: {case['provider']}:", file=sys.stderr)
        traceback.print_exception(error)
    return error.with_traceback(None)


_group = None  # the group being run (see interleaved)


@contextlib.contextmanager
def interleaved(cases: list, device: torch.device, cpu_repeats: int = 3):
    """Within this block, :func:`run_case` times the providers of one group (``cases``) together,
    round-robin: the first call builds them all and times them interleaved; each call then measures
    its own case's memory and returns its row. Outside it, a case is timed alone."""
    global _group
    _group = _Group(cases, device, cpu_repeats)
    try:
        yield
    finally:
        _group = None


def run_case(case: dict, device: torch.device, measure_memory: bool = True, cpu_repeats: int = 3) -> Row:
    row = case_row(case)
    if case.get("interpret"):  # memory only, in a subprocess (see the module docstring)
        row.note = INTERPRETED
        if not measure_memory:
            row.status = "skipped: a memory-only case (Triton's interpreter) run without memory measurement"
            return row
        row.peak_mib = cpu_peak_mib(case)
        return row
    timing_note = None
    try:
        if _group is not None and _group.holds(case):
            bench, row.median_ms, timing_note = _group.take(case)
        else:
            bench = suite_module(case["suite"]).build(case, device)
    except Skip as why:
        row.status = f"skipped: {why}"
        return row
    row.note = "; ".join(n for n in (bench.note, timing_note) if n) or None
    if row.median_ms is None:
        if bench.setup is not None:
            bench.setup()
        row.median_ms = time_ms(bench.fn, device, cpu_repeats)
    if bench.flops:
        row.tflops = bench.flops / (row.median_ms * 1e-3) / 1e12
    if bench.bytes:
        row.gbps = bench.bytes / (row.median_ms * 1e-3) / 1e9
    if measure_memory:
        row.peak_mib = cuda_peak_mib(bench.fn) if device.type == "cuda" else cpu_peak_mib(case)
    if device.type == "cuda" and getattr(suite_module(case["suite"]), "COUNT_KERNELS", False):
        row.kernels = cuda_kernels_per_call(bench.fn)
    del bench
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_speedups(rows: list, baselines: dict, memory_suites=()) -> None:
    """Fill ``row.speedup[b] = time(b) / time(row)`` for every baseline b measured in the same group,
    and for the suites of ``memory_suites`` ``row.memory_ratio[b] = peak(row) / peak(b)``.

    ``baselines`` maps a suite to its baseline providers (e.g. attention: naive, sdpa).
    """
    by_group = {}
    for r in rows:
        by_group.setdefault(r.group, {})[r.provider] = r
    for r in rows:
        for b in baselines.get(r.suite, ()):
            base = by_group[r.group].get(b)
            if base is None or base is r:
                continue
            if r.median_ms is not None and base.median_ms is not None:
                r.speedup[b] = base.median_ms / r.median_ms
            if r.suite in memory_suites and r.peak_mib is not None and base.peak_mib:
                r.memory_ratio[b] = r.peak_mib / base.peak_mib


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


