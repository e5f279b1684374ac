#!/usr/bin/env bash
# Everything that needs a GPU, in one call from the repository root, within DEADLINE_S seconds
# (default 540: one 10-minute command, with a margin). Steps, in order (STEPS, default all three):
#   tests  the whole test suite on CUDA (bf16 and the GPU-only tests included), spread over
#          TEST_WORKERS processes (default 8) when pytest-xdist is installed; stopped after TESTS_S
#          seconds (default 210), the log then shows how far it got;
#   bench  the benchmark report with the headline cases (the issues' targets) first, starting no
#          case after BENCH_S seconds (default 200): the rest are recorded as skipped, and the JSON
#          is rewritten after every case; then the plots;
#   tune   python -m benchmarks.tune on what is left of the deadline (skipped under 90 s), TUNE_ARGS
#          (default: bf16 only) choosing the groups; the proposed _LAUNCH entries in the log.
# Results go to $OUT (default benchmarks/results): <device>-<date>.json and its PNG plots,
# tune-<device>-<date>.json, and logs-<device>-<date>.tar.gz holding every log and table, so that
# at most 8 files come back from a machine that returns only a few. summary.txt (inside the archive,
# and printed last) holds the test outcome and the tables.
#   OUT=/some/dir bash benchmarks/run_gpu.sh
#   STEPS=bench BENCH_S=480 bash benchmarks/run_gpu.sh
# Uses the installed torch/triton (no network needed): PYTHONPATH points at the checkout.
set -u
cd "$(dirname "$0")/.."
START=$SECONDS
OUT=${OUT:-benchmarks/results}
STEPS=${STEPS:-tests bench tune}
DEADLINE_S=${DEADLINE_S:-540}
TESTS_S=${TESTS_S:-210}
BENCH_S=${BENCH_S:-200}
TEST_WORKERS=${TEST_WORKERS:-8}
TUNE_ARGS=${TUNE_ARGS:---dtypes bfloat16}
mkdir -p "$OUT"
LOGS=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
left() { echo $((DEADLINE_S - (SECONDS - START))); }
cap() { local want=$1 rest; rest=$(left); echo $((want < rest ? want : rest)); }

if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "run_gpu.sh: torch sees no CUDA device; this script is for a GPU machine" >&2
  exit 2
fi
python - <<'PY' | tee "$LOGS/environment.txt"
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name} | {p.multi_processor_count} SMs | {p.total_memory / 2**30:.0f} GiB | "
      f"torch {torch.__version__} | triton {triton.__version__} | CUDA {torch.version.cuda}")
PY
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv \
  >>"$LOGS/environment.txt" 2>&1
name=$(python -c "import torch,re,datetime;print(re.sub(r'[^a-z0-9]+','-',torch.cuda.get_device_name().lower()).strip('-')+'-'+datetime.date.today().isoformat())")
: >"$LOGS/summary.txt"

for step in $STEPS; do
  case $step in
    tests)
      xdist=()
      python -c "import xdist" 2>/dev/null && xdist=(-n "$TEST_WORKERS")
      t=$(cap "$TESTS_S")
      timeout -k 10 "$t" python -m pytest -p no:cacheprovider -rfEs -v "${xdist[@]}" tests >"$LOGS/tests-cuda.log" 2>&1
      rc=$?
      { echo "== tests on CUDA (exit $rc$([ $rc = 124 ] && echo ": stopped after $t s"))"
        grep -cE "(PASSED|SKIPPED|FAILED|ERROR)( |$)" "$LOGS/tests-cuda.log" | sed 's/^/results logged: /'
        grep -E "FAILED|ERROR|^=+ .*(passed|failed|error)" "$LOGS/tests-cuda.log" | awk '!seen[$0]++' | tail -n 60
      } >>"$LOGS/summary.txt" ;;
    bench)
      t=$(cap "$BENCH_S")
      timeout -k 10 $((t + 100)) python -m benchmarks.report --headline-first --budget-s "$t" \
        --out "$OUT/$name.json" >"$LOGS/bench-table.txt" 2>"$LOGS/bench-progress.log"
      rc=$?
      { echo "== benchmarks (exit $rc)"; cat "$LOGS/bench-table.txt"; } >>"$LOGS/summary.txt" ;;
    tune)
      t=$(($(left) - 45))
      if [ "$t" -lt 90 ]; then
        echo "== tune: skipped, $(left) s left of the deadline" >>"$LOGS/summary.txt"
        continue
      fi
      # the tuner stops starting candidates at its budget; timeout only guards against a hang
      timeout -k 10 $((t + 30)) python -m benchmarks.tune --budget-s "$t" $TUNE_ARGS \
        --out "$OUT/tune-$name.json" >"$LOGS/tune-table.txt" 2>"$LOGS/tune-progress.log"
      rc=$?
      { echo "== tune (exit $rc, budget $t s)"; cat "$LOGS/tune-table.txt"; } >>"$LOGS/summary.txt" ;;
    *)
      echo "run_gpu.sh: unknown step '$step'; expected tests, bench or tune" >&2 ;;
  esac
done
echo "== done in $((SECONDS - START)) s" >>"$LOGS/summary.txt"
tar -czf "$OUT/logs-$name.tar.gz" -C "$LOGS" .
ls -l "$OUT"
cat "$LOGS/summary.txt"
