"""benchmarks/run_gpu.sh's quick mode, orchestrated on the CPU: a stand-in Python answers the CUDA
check and records each step's command, so the order of the steps, their budgets within the
6-minute deadline and the files they are told to write are checked without a GPU."""

import os
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_PYTHON = r"""#!/usr/bin/env bash
# answers run_gpu.sh's inline checks; records "-m module args" and creates the files named by --out
if [ "$1" = "-c" ]; then
  case "$2" in *is_available*) exit 0 ;; *get_device_name*) echo "fake-gpu-2026-12-02"; exit 0 ;; esac
  exit 0
fi
if [ "$1" = "-" ]; then cat >/dev/null; echo "device: fake"; exit 0; fi
if [ "$1" = "-m" ]; then
  echo "$* cache=${ATTNSR_CACHE_DIR:-}" >>"$CALLS"
  prev=""
  for a in "$@"; do
    if [ "$prev" = "--out" ] || [ "$prev" = "--json" ]; then mkdir -p "$(dirname "$a")"; echo '{}' >"$a"; fi
    prev=$a
  done
  echo "ran $2"
  exit 0
fi
exit 0
"""


@pytest.mark.skipif(os.name != "posix", reason="a bash script")
def test_quick_mode_runs_its_steps_in_order_within_six_minutes(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.txt"
    out = tmp_path / "out"
    env = dict(os.environ, QUICK="1", PYTHON=str(fake), CALLS=str(calls), OUT=str(out), PATH=os.environ["PATH"])
    done = subprocess.run(["bash", "benchmarks/run_gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    modules = [line.split()[1] for line in calls.read_text().splitlines()]
    assert modules == ["benchmarks.launch_check", "benchmarks.report", "benchmarks.report", "attnsr.tune",
                       "benchmarks.profile", "benchmarks.host"]
    lines = calls.read_text().splitlines()
    tune = next(line for line in lines if "attnsr.tune" in line)
    assert "--quick" in tune and int(tune.split("--budget-s ")[1].split()[0]) <= 80
    assert tune.endswith(f"cache={out}")  # the tuned table lands in the results folder; later steps read it
    assert next(line for line in lines if "benchmarks.profile" in line).endswith(f"cache={out}")
    bench = next(line for line in lines if "--headline-first" in line)
    assert int(bench.split("--budget-s ")[1].split()[0]) <= 110 * 3 // 4
    written = sorted(os.listdir(out))
    assert "profile-fake-gpu-2026-12-02.json" in written and "host-fake-gpu-2026-12-02.json" in written
    assert "logs-fake-gpu-2026-12-02.tar.gz" in written and len(written) <= 8
    assert "== attnsr tune --quick (exit 0" in done.stdout and "== profile (exit 0" in done.stdout
