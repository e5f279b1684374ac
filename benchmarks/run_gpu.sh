#!/usr/bin/env bash
# Everything that needs a GPU, in one call from the repository root, within DEADLINE_S seconds
# (default 540: one 10-minute command, with a margin). Steps, in order (STEPS, default all four):
#   launch every launch-table entry of the attention kernels once, each in its own process, against
#          float64 (python -m benchmarks.launch_check; a kernel that faults loses its process's CUDA
#          context, so in a shared process one fault hides the rest); at most LAUNCH_S seconds
#          (default 90); its rows go into the logs archive;
#   tests  the whole test suite on CUDA, the GPU-only tests (marked gpu: native bf16, tf32,
#          inductor, AMP) first, spread over TEST_WORKERS processes (default 14) when pytest-xdist
#          is installed; stopped after TESTS_S seconds (default 210), the log then shows how far it got;
#   bench  the benchmark report with the headline cases (the issues' targets) first, starting no
#          group of cases after 3/4 of BENCH_S seconds (default 240): the rest are recorded as skipped,
#          and the JSON is rewritten after every case; then the plots; BENCH_ARGS (default none)
#          adds report options, e.g. "--suite window" for the rows no earlier run reached;
#   tune   python -m benchmarks.tune on what is left of the deadline (skipped under 90 s), TUNE_ARGS
#          (default: bf16 only) choosing the groups; the proposed _LAUNCH entries in its table;
#   attnsr-tune  `attnsr tune --quick` (python -m attnsr.tune) within ATTNSR_TUNE_S seconds: launch
#          settings and auto's choices measured on this GPU, the table written to $OUT (as
#          ATTNSR_CACHE_DIR), so the later steps run with it;
#   profile  python -m benchmarks.profile: GPU time per kernel of one forward+backward of each
#          headline case, fused and torch path (and auto for the networks), within PROFILE_S seconds;
#   host   python -m benchmarks.host: wall µs per call of tiny attention calls, fused beside SDPA.
# QUICK=1: the run that fits 6 minutes on an H200 (DEADLINE_S 360): launch check (45 s), the headline
# benchmark cases (110 s), attnsr tune --quick, the per-kernel profile (60 s) and the host rows.
# No step starts or runs past the deadline. Results go to $OUT (default benchmarks/results):
# <device>-<date>.json and its PNG plots, tune-<device>-<date>.json, and
# logs-<device>-<date>.tar.gz (every log and table, rewritten after each step, so a run killed
# from outside keeps what was done): at most 8 files, for a machine that returns only a few.
# Printed last: the start of the benchmark table (headline groups first), the tuner's table and
# the test outcome, the part a caller that sees only the tail of the output needs most.
#   QUICK=1 bash benchmarks/run_gpu.sh
#   OUT=/some/dir bash benchmarks/run_gpu.sh
#   STEPS=bench BENCH_S=480 bash benchmarks/run_gpu.sh
#   STEPS="launch bench" BENCH_ARGS="--suite window" bash benchmarks/run_gpu.sh
# Uses the installed torch/triton (no network needed) through python3, or $PYTHON; PYTHONPATH
# points at the checkout.
set -u
cd "$(dirname "$0")/.."
START=$SECONDS
OUT=${OUT:-benchmarks/results}
if [ "${QUICK:-0}" = 1 ]; then
  STEPS=${STEPS:-launch bench attnsr-tune profile host}
  DEADLINE_S=${DEADLINE_S:-360}
  LAUNCH_S=${LAUNCH_S:-45}
  BENCH_S=${BENCH_S:-110}
  ATTNSR_TUNE_S=${ATTNSR_TUNE_S:-90}
  PROFILE_S=${PROFILE_S:-60}
fi
STEPS=${STEPS:-launch tests bench tune}
LAUNCH_S=${LAUNCH_S:-90}
DEADLINE_S=${DEADLINE_S:-540}
TESTS_S=${TESTS_S:-210}
BENCH_S=${BENCH_S:-240}
ATTNSR_TUNE_S=${ATTNSR_TUNE_S:-180}
PROFILE_S=${PROFILE_S:-90}
TEST_WORKERS=${TEST_WORKERS:-14}  # Triton's compiles are CPU-bound: most of the 16 cores
TUNE_ARGS=${TUNE_ARGS:---dtypes bfloat16}
BENCH_ARGS=${BENCH_ARGS:-}
MARGIN_S=20  # packing the logs, and the kill grace of the last step
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the interpreter that has torch (python3 on the GPU image)
mkdir -p "$OUT"
LOGS=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
left() { echo $((DEADLINE_S - MARGIN_S - (SECONDS - START))); }
cap() { local want=$1 rest; rest=$(left); echo $((want < rest ? want : rest)); }
stopped() { case $1 in 124|137) echo ": stopped at its time limit" ;; esac; }

if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "run_gpu.sh: torch sees no CUDA device; this script is for a GPU machine" >&2
  exit 2
fi
"$PY" - <<'END' | tee "$LOGS/environment.txt"
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name} | {p.multi_processor_count} SMs | {p.total_memory / 2**30:.0f} GiB | "
      f"torch {torch.__version__} | triton {triton.__version__} | CUDA {torch.version.cuda}")
END
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv \
  >>"$LOGS/environment.txt" 2>&1
name=$("$PY" -c "import torch,re,datetime;print(re.sub(r'[^a-z0-9]+','-',torch.cuda.get_device_name().lower()).strip('-')+'-'+datetime.date.today().isoformat())")
pack() { tar -czf "$OUT/logs-$name.tar.gz.tmp" -C "$LOGS" . && mv "$OUT/logs-$name.tar.gz.tmp" "$OUT/logs-$name.tar.gz"; }
: >"$LOGS/launch.txt"; : >"$LOGS/tests.txt"; : >"$LOGS/bench.txt"; : >"$LOGS/tune.txt"
: >"$LOGS/attnsr-tune.txt"; : >"$LOGS/profile.txt"; : >"$LOGS/host.txt"

for step in $STEPS; do
  case $step in
    launch)
      t=$(cap "$LAUNCH_S")
      if [ "$t" -lt 20 ]; then echo "== launch check: skipped, $(left) s left" >"$LOGS/launch.txt"; continue; fi
      timeout -k 5 "$t" "$PY" -m benchmarks.launch_check --jobs 8 --timeout-s $((t / 2)) --json "$LOGS/launch-check.json" \
        >"$LOGS/launch-table.txt" 2>&1
      rc=$?
      { echo "== launch check (exit $rc$(stopped $rc), limit $t s)"; tail -n 1 "$LOGS/launch-table.txt"
        grep -vE "^\| [^|]+ \| ok \|" "$LOGS/launch-table.txt" | grep "^| " | head -n 30; } >"$LOGS/launch.txt" ;;
    tests)
      t=$(cap "$TESTS_S")
      if [ "$t" -lt 30 ]; then echo "== tests: skipped, $(left) s left" >"$LOGS/tests.txt"; continue; fi
      xdist=()
      "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "$TEST_WORKERS")
      # SIGINT at the limit: pytest then stops as on Ctrl-C and still prints the failures so far with
      # their tracebacks (a plain kill loses them: a first H200 run showed which tests failed, not why)
      pytest_for() { timeout -s INT -k 15 "$1" "$PY" -m pytest -p no:cacheprovider -rfEs --tb=short -v "${xdist[@]}" \
        -m "$2" tests >>"$LOGS/tests-cuda.log" 2>&1; }
      # the GPU-only tests (native bf16, tf32, inductor, AMP) first, then the rest in the time left
      : >"$LOGS/tests-cuda.log"
      begun=$SECONDS
      pytest_for "$t" gpu
      rc_gpu=$?
      t2=$((t - (SECONDS - begun)))
      rc=124
      if [ "$t2" -ge 10 ]; then
        pytest_for "$t2" "not gpu"
        rc=$?
      fi
      { echo "== tests on CUDA: GPU-only tests exit $rc_gpu$(stopped $rc_gpu), the rest exit $rc$(stopped $rc) (limit $t s)"
        # one verdict per test line: "tests/x.py::t PASSED [ 5%]" or, with xdist, "[gw0] [ 5%] PASSED tests/x.py::t"
        grep -oE "^\[gw[0-9]+\] \[ *[0-9]+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) |::[^ ]+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) +\[" \
          "$LOGS/tests-cuda.log" | grep -oE "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS" | sort | uniq -c | tr '\n' ' '
        echo
        grep -E "^(FAILED|ERROR) |^=+ .*(passed|failed|error)" "$LOGS/tests-cuda.log" | tail -n 40
      } >"$LOGS/tests.txt" ;;
    bench)
      t=$(cap "$BENCH_S")
      if [ "$t" -lt 30 ]; then echo "== benchmarks: skipped, $(left) s left" >"$LOGS/bench.txt"; continue; fi
      # the report starts no group after its budget; the timeout ends a group that overruns the deadline
      # shellcheck disable=SC2086  # BENCH_ARGS: several words
      timeout -k 5 "$(left)" "$PY" -m benchmarks.report --headline-first $BENCH_ARGS \
        --budget-s $((t * 3 / 4)) --out "$OUT/$name.json" >"$LOGS/bench-table.txt" 2>"$LOGS/bench-progress.log"
      rc=$?
      # the table again from the JSON: it holds every case that finished, even if the report was stopped
      "$PY" -m benchmarks.report --table "$OUT/$name.json" >"$LOGS/bench-rows.txt" 2>&1
      # a quick run returns few files: its plots go into the logs archive
      [ "${QUICK:-0}" = 1 ] && mv "$OUT/$name"-*.png "$LOGS"/ 2>/dev/null
      { echo "== benchmarks (exit $rc$(stopped $rc))"; tail -n 1 "$LOGS/bench-rows.txt"
        head -c 5000 "$LOGS/bench-rows.txt"; echo; } >"$LOGS/bench.txt" ;;
    tune)
      t=$(($(left) - 30))
      if [ "$t" -lt 90 ]; then echo "== tune: skipped, $(left) s left" >"$LOGS/tune.txt"; continue; fi
      # the tuner stops starting candidates at its budget; the timeout only guards against a hang
      timeout -k 5 $((t + 25)) "$PY" -m benchmarks.tune --budget-s "$t" $TUNE_ARGS \
        --out "$OUT/tune-$name.json" >"$LOGS/tune-table.txt" 2>"$LOGS/tune-progress.log"
      rc=$?
      { echo "== tune (exit $rc$(stopped $rc), budget $t s)"; tail -c 3000 "$LOGS/tune-table.txt"; } >"$LOGS/tune.txt" ;;
    attnsr-tune)
      t=$(cap "$ATTNSR_TUNE_S")
      if [ "$t" -lt 30 ]; then echo "== attnsr tune: skipped, $(left) s left" >"$LOGS/attnsr-tune.txt"; continue; fi
      # the table lands in $OUT (the cache directory of this run); the steps after it read it
      case $OUT in /*) ATTNSR_CACHE_DIR=$OUT ;; *) ATTNSR_CACHE_DIR=$PWD/$OUT ;; esac
      export ATTNSR_CACHE_DIR
      timeout -k 5 $((t + 20)) "$PY" -m attnsr.tune --quick --budget-s $((t - 10)) \
        >"$LOGS/attnsr-tune-table.txt" 2>"$LOGS/attnsr-tune-progress.log"
      rc=$?
      { echo "== attnsr tune --quick (exit $rc$(stopped $rc), budget $((t - 10)) s)"; tail -c 2500 "$LOGS/attnsr-tune-progress.log"
        cat "$LOGS/attnsr-tune-table.txt"; } >"$LOGS/attnsr-tune.txt" ;;
    profile)
      t=$(cap "$PROFILE_S")
      if [ "$t" -lt 20 ]; then echo "== profile: skipped, $(left) s left" >"$LOGS/profile.txt"; continue; fi
      timeout -k 5 "$t" "$PY" -m benchmarks.profile --budget-s $((t * 2 / 3)) --out "$OUT/profile-$name.json" \
        --table "$LOGS/profile-table.txt" >/dev/null 2>"$LOGS/profile-progress.log"
      rc=$?
      { echo "== profile (exit $rc$(stopped $rc), limit $t s)"; head -c 6000 "$LOGS/profile-table.txt"; } >"$LOGS/profile.txt" ;;
    host)
      t=$(cap 40)
      if [ "$t" -lt 10 ]; then echo "== host: skipped, $(left) s left" >"$LOGS/host.txt"; continue; fi
      timeout -k 5 "$t" "$PY" -m benchmarks.host --rounds 5 --calls 100 --out "$OUT/host-$name.json" \
        >"$LOGS/host-table.txt" 2>"$LOGS/host-progress.log"
      rc=$?
      { echo "== host cost per call (exit $rc$(stopped $rc))"; cat "$LOGS/host-table.txt"; } >"$LOGS/host.txt" ;;
    *)
      echo "run_gpu.sh: unknown step '$step'; expected launch, tests, bench, tune, attnsr-tune, profile or host" >&2 ;;
  esac
  pack
done
echo "== done in $((SECONDS - START)) s" >>"$LOGS/tests.txt"
cat "$LOGS/bench.txt" "$LOGS/attnsr-tune.txt" "$LOGS/profile.txt" "$LOGS/host.txt" "$LOGS/tune.txt" "$LOGS/launch.txt" \
  "$LOGS/tests.txt" >"$LOGS/summary.txt"
pack
ls -l "$OUT"
cat "$LOGS/summary.txt"
