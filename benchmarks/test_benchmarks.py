"""Every case of every suite as a pytest-benchmark, grouped so that a group compares providers on
one shape, dtype and mode. pytest-benchmark times each case on its own; `python -m benchmarks.report`
runs the same cases with a group's providers timed interleaved (round-robin, so that a machine whose
load changes cannot flip a ratio) and adds peak memory, ratios, JSON and plots.

The unit tests of the harness (round-robin timing, FLOP counts, the recorded commit, the models
suite's cases) are in tests/test_bench_timing.py, which `make test` runs."""

import sys

import pytest
import torch

from benchmarks import harness

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = "--bench-quick" in sys.argv
CASES = [c for s in harness.SUITES for c in harness.suite_module(s).cases(DEVICE, QUICK)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['group']} :: {c['provider']}".replace(" ", "_"))
def test_benchmark(benchmark, case):
    try:
        bench = harness.suite_module(case["suite"]).build(case, DEVICE)
    except harness.Skip as why:
        pytest.skip(str(why))
    if bench.setup is not None:
        bench.setup()

    def call():
        bench.fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = case["group"]
    benchmark.extra_info.update(provider=case["provider"], flops=bench.flops, bytes=bench.bytes,
                                device=harness.device_info(DEVICE)["device"])
    rounds = 20 if DEVICE.type == "cuda" else 3
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1)
    assert benchmark.stats.stats.median > 0
