"""The benchmark harness's measurement rules: providers of a case timed round-robin, forward +
backward FLOPs as 3.5× the forward, the source commit in every results file, and the models suite's
cases on a CPU.

No real timing here (timings belong to benchmarks): the timed functions are stubs that advance a
fake clock by their cost, so every median is known exactly.
"""

import importlib.util
import json
import subprocess
import types

import pytest
import torch

from attnsr import timing
from benchmarks import attention, harness, models, networks, report, window

CPU = torch.device("cpu")


class Clock:
    """A fake ``time.perf_counter``: stubs advance it by their cost × the machine's current load."""

    def __init__(self):
        self.now, self.load, self.calls = 0.0, 1.0, []

    def __call__(self):
        return self.now

    def stub(self, name, cost_ms):
        def fn():
            self.calls.append(name)
            self.now += cost_ms * self.load / 1e3

        return fn


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    return clock


def test_providers_are_called_round_robin_after_their_warm_up(clock):
    fns = {p: clock.stub(p, cost) for p, cost in (("a", 1.0), ("b", 2.0), ("c", 4.0))}
    times = timing.time_interleaved(fns, CPU, cpu_repeats=3)
    # one warm-up call each, then rounds calling each once in turn, each round starting one further
    warm_up, rounds = clock.calls[:3], [clock.calls[i:i + 3] for i in range(3, len(clock.calls), 3)]
    assert warm_up == ["a", "b", "c"] and rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert times == pytest.approx({"a": 1.0, "b": 2.0, "c": 4.0})


def test_a_machine_busy_halfway_does_not_change_the_ratio(clock):
    """The load quadruples after the second timed round starts: timed one after the other, the
    second provider takes every slow call (8× the first instead of 2×); interleaved, both do."""
    def run(time_them):
        clock.now, clock.load, clock.calls = 0.0, 1.0, []
        fns = {"naive": clock.stub("naive", 1.0), "fused": clock.stub("fused", 2.0)}
        real = fns["fused"]

        def fused():
            if len(clock.calls) >= 4:  # from the fifth call on, another job shares the machine
                clock.load = 4.0
            real()

        fns["fused"] = fused
        return time_them(fns)

    interleaved = run(lambda fns: timing.time_interleaved(fns, CPU, cpu_repeats=3))
    assert interleaved["fused"] / interleaved["naive"] == pytest.approx(2.0)
    one_by_one = run(lambda fns: {name: timing.time_interleaved({name: fn}, CPU, 3)[name] for name, fn in fns.items()})
    assert one_by_one["fused"] / one_by_one["naive"] == pytest.approx(8.0)


def test_a_provider_that_raises_is_dropped_and_the_others_are_timed(clock):
    broken_calls = []

    def broken():
        broken_calls.append(1)
        if len(broken_calls) == 2:  # passes its warm-up, fails in the first round
            raise RuntimeError("out of memory")

    errors = {}
    times = timing.time_interleaved({"a": clock.stub("a", 1.0), "broken": broken}, CPU, 3, errors=errors)
    assert times == pytest.approx({"a": 1.0}) and len(broken_calls) == 2
    assert isinstance(errors["broken"], RuntimeError) and str(errors["broken"]) == "out of memory"
    with pytest.raises(RuntimeError, match="out of memory"):  # without an errors dict it propagates
        broken_calls.clear()
        timing.time_interleaved({"broken": broken}, CPU, 3)


def _fake_suite(clock, built):
    """A suite of one group: providers a (1 ms), b (3 ms), a skipped one and one whose build fails."""
    cases = [{"suite": "fake", "group": "g", "op": "op", "provider": p, "shape": "1x1x8x8", "dtype": "float32",
              "mode": "fwd"} for p in ("a", "b", "skip", "broken")]

    def build(case, device):
        built.append(case["provider"])
        if case["provider"] == "skip":
            raise harness.Skip("not on this device")
        if case["provider"] == "broken":
            raise ValueError("bad shape")
        return harness.Bench(clock.stub(case["provider"], {"a": 1.0, "b": 3.0}[case["provider"]]), flops=6e9)

    return types.SimpleNamespace(cases=lambda device, quick: cases, build=build, headline=lambda case: False), cases


def test_report_times_a_groups_providers_together(tmp_path, clock, monkeypatch):
    built = []
    suite, cases = _fake_suite(clock, built)
    monkeypatch.setattr(harness, "suite_module", lambda name: suite)
    out = tmp_path / "r.json"
    report.run(["fake"], quick=True, memory=False, out=str(out), cpu_repeats=3)
    # every provider is built before any is timed, then a and b alternate
    assert built == ["a", "b", "skip", "broken"]
    assert clock.calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rounds of two
    payload = json.loads(out.read_text())
    rows = {r["provider"]: r for r in payload["rows"]}
    assert (rows["a"]["median_ms"], rows["b"]["median_ms"]) == pytest.approx((1.0, 3.0))
    assert rows["a"]["tflops"] == pytest.approx(6.0)  # 6 GFLOP in 1 ms
    assert rows["skip"]["status"] == "skipped: not on this device"
    assert rows["broken"]["status"] == "failed: ValueError: bad shape"
    assert payload["info"]["fwd_bwd_flops"] == 3.5
    assert set(payload["info"]) >= {"commit", "dirty"}
    # outside a report run (no group declared) a case is timed alone
    row = harness.run_case(cases[1], CPU, measure_memory=False, cpu_repeats=3)
    assert row.median_ms == pytest.approx(3.0) and clock.calls[-4:] == ["b"] * 4


def test_forward_backward_flops_are_three_and_a_half_forwards():
    assert harness.FWD_BWD_FLOPS == 3.5
    case = {"size": 64, "channels": 64, "heads": 1, "patch": 1, "batch": 4}
    fwd = attention.flops({**case, "mode": "fwd"})
    assert fwd == 4 * 4 * 4096 * 4096 * 64  # 4·B·N·M·D
    assert attention.flops({**case, "mode": "fwd+bwd"}) == 3.5 * fwd
    case = {"batch": 2, "size": 32, "window": 8}
    fwd = window.flops({**case, "mode": "fwd"})
    assert fwd == 4 * 2 * 32 * 32 * 64 * window.CHANNELS
    assert window.flops({**case, "mode": "fwd+bwd"}) == 3.5 * fwd
    step = networks.flops({"op": "ImageInpaintingModel", "size": 32, "batch": 1})
    assert step == 3.5 * sum(4 * n * n * d for n, d in ((1024, 64), (256, 128), (64, 256), (256, 128), (1024, 64)))


def _git(cwd, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_results_record_the_source_commit(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "commit", "-q", "-m", "one")
    head = _git(repo, "rev-parse", "HEAD")
    (repo / "untracked.txt").write_text("not part of the tree\n")
    assert timing.source_commit(str(repo)) == {"commit": head, "dirty": False}
    (repo / "a.py").write_text("x = 2\n")
    assert timing.source_commit(str(repo)) == {"commit": head, "dirty": True}
    # a wheel installed in a virtual environment inside a checkout is not that checkout
    (repo / "site-packages").mkdir()
    assert timing.source_commit(str(repo / "site-packages")) == {"commit": None, "dirty": None}
    assert timing.source_commit(str(tmp_path)) == {"commit": None, "dirty": None}
    info = timing.device_info(CPU)
    assert info["commit"] == timing.source_commit()["commit"] and "dirty" in info


def test_models_suite_cases_on_cpu():
    cases = models.cases(CPU)
    assert {(c["op"], c["provider"]) for c in cases} == {(m, p) for m in models.MODELS for p in models.PROVIDERS}
    assert all(c["config"] == "small" and c["batch"] == 1 and c["dtype"] == "float32" for c in cases)
    spandrel = importlib.util.find_spec("spandrel") is not None
    interpreted = {c["op"] for c in cases if c.get("interpret")}
    assert all(c["provider"] == "triton" for c in cases if c.get("interpret"))
    assert interpreted == (set(models.MODELS) if spandrel else {"AttentionSRNet", "ImageInpaintingModel"})
    gpu = models.cases(torch.device("cuda"))
    assert {c["config"] for c in gpu} == {"paper"} and not any(c.get("interpret") for c in gpu)
    hat = next(c for c in gpu if c["op"] == "HAT")
    assert (hat["batch"], hat["size"]) == (32, 64)


@pytest.mark.parametrize("provider", ["eager", "auto"])
def test_models_suite_builds_a_training_step_on_cpu(provider, monkeypatch):
    """A step is forward, L1 loss, backward and one Adam step over every parameter."""
    steps = []
    adam_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        steps.append([p.grad is not None for g in self.param_groups for p in g["params"]])
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    for case in models.cases(CPU, quick=True):
        if case["provider"] != provider:
            continue
        if case["op"] in models.PUBLISHED and importlib.util.find_spec("spandrel") is None:
            with pytest.raises(harness.Skip, match=r"needs spandrel: pip install spandrel \(the models extra\)"):
                models.build(case, CPU)
            continue
        bench = models.build(case, CPU)
        bench.fn()
        assert len(steps) == 1 and steps[0] and all(steps[0]), f"{case['group']}: not every parameter got a gradient"
        steps.clear()
        if provider == "auto":
            expected = "swapped to SwinBlock" if case["op"] == "SwinIR" else "backend switched: ChannelAttention"
            assert bench.note.startswith(expected), bench.note


def test_models_suite_triton_on_cpu_is_memory_only_in_a_subprocess():
    case = next(c for c in models.cases(CPU) if c["op"] == "AttentionSRNet" and c["provider"] == "triton")
    assert case["interpret"]
    row = harness.run_case(case, CPU, measure_memory=False)
    assert row.status.startswith("skipped: a memory-only case") and row.median_ms is None
    assert row.note == harness.INTERPRETED


def test_cpu_timing_uses_the_cores_other_processes_leave_free(monkeypatch):
    """Beside a job holding a core, PyTorch's threads would wait on each other in every parallel
    region: timings take one thread fewer per busy core, and PyTorch's setting comes back after."""
    monkeypatch.setattr(timing.os, "cpu_count", lambda: 4)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for busy, threads in ((0.2, 4), (1.4, 3), (2.6, 1), (8.0, 1), (None, 4)):
            monkeypatch.setattr(timing, "busy_cores", lambda busy=busy: busy)
            with timing.threads_on_free_cores(CPU) as got:
                assert got == (threads, busy) and torch.get_num_threads() == threads
            assert torch.get_num_threads() == 4
        with timing.threads_on_free_cores(torch.device("cuda")) as got:  # a GPU's timing is left alone
            assert got == (None, None) and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
    assert timing.busy_cores(0.05) >= 0.0


def test_cuda_timing_warms_up_then_times_rounds_with_events(clock, monkeypatch):
    """The CUDA path with CUDA stood in for (events read the fake clock): a slow call is estimated
    from one call, a fast one from five; warm-up fills ``warmup_ms``; the rounds give each provider
    about ``rep_ms``, alternate, and every call has its own pair of events and an L2 flush before it."""
    flushes = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = None

        def record(self):
            self.at = clock.now

        def elapsed_time(self, end):
            return (end.at - self.at) * 1e3

    class Buffer:
        def zero_(self):
            flushes.append(len(clock.calls))

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(timing, "_l2_flush_buffer", lambda device: Buffer())
    fns = {"slow": clock.stub("slow", 20.0), "fast": clock.stub("fast", 2.0)}
    times = timing.time_interleaved(fns, torch.device("cuda"), warmup_ms=25.0, rep_ms=100.0)
    assert times == pytest.approx({"slow": 20.0, "fast": 2.0})
    # slow: first call, one to estimate (20 ms > 10), 25 // 20 = 1 warm-up call;
    # fast: first call, one then five to estimate, 25 // 2 = 12 warm-up calls
    warm = ["slow"] * 3 + ["fast"] * (1 + 1 + 5 + 12)
    assert clock.calls[:len(warm)] == warm
    rounds = clock.calls[len(warm):]
    assert len(rounds) == 2 * int(100.0 * 2 / 22.0)  # 9 rounds of two
    assert rounds[:4] == ["slow", "fast", "fast", "slow"]
    assert flushes[-len(rounds):] == list(range(len(warm), len(clock.calls)))  # one flush before each timed call
