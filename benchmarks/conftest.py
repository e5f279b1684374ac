"""pytest-benchmark entry: `pytest benchmarks/` (add `--bench-quick` for a small subset).

Not part of `make test`, which runs `pytest tests`.
"""


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true", help="run a small subset of every benchmark suite")
