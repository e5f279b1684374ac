#!/usr/bin/env bash
# Everything that needs a GPU, from the repository root, in steps (STEPS, default all three):
#   tests  the whole test suite on CUDA (bf16 and the GPU-only tests included);
#   tune   python -m benchmarks.tune: candidate launch configurations of the attention kernels,
#          TUNE_BUDGET seconds (default 420) of compiling and timing, then the table of the best
#          per kernel × head dim × dtype and the proposed _LAUNCH entries (about 8 minutes in all);
#   bench  every benchmark suite through the report (JSON + plots).
# Where one command may run at most 10 minutes, run the steps in separate calls:
#   STEPS=tune bash benchmarks/run_gpu.sh
#   STEPS="tests bench" bash benchmarks/run_gpu.sh      # or STEPS=tests, then STEPS=bench
# Uses the installed torch/triton (no network needed): PYTHONPATH points at the checkout.
# Results go to $OUT (default benchmarks/results); BENCH_ARGS and TUNE_ARGS add arguments.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
STEPS=${STEPS:-tests tune bench}
TUNE_BUDGET=${TUNE_BUDGET:-420}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY' | tee "$OUT/environment.txt"
import torch, triton
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
PY
name=$(python -c "import torch,re,datetime;print(re.sub(r'[^a-z0-9]+','-',torch.cuda.get_device_name().lower()).strip('-')+'-'+datetime.date.today().isoformat())")
for step in $STEPS; do
  case $step in
    tests)
      python -m pytest -q -p no:cacheprovider tests 2>&1 | tail -n 60 | tee "$OUT/tests-cuda.log" ;;
    tune)
      # the tuner stops starting candidates at its budget; timeout only guards against a hang
      timeout -k 15 $((TUNE_BUDGET + 120)) python -m benchmarks.tune --budget-s "$TUNE_BUDGET" ${TUNE_ARGS:-} \
        --out "$OUT/tune-$name.json" 2>"$OUT/tune-progress.log" | tee "$OUT/tune-table.txt" ;;
    bench)
      python -m benchmarks.report ${BENCH_ARGS:-} --out "$OUT/$name.json" 2>"$OUT/bench-progress.log" \
        | tee "$OUT/bench-table.txt" ;;
    *)
      echo "run_gpu.sh: unknown step '$step'; expected tests, tune or bench" >&2 ;;
  esac
done
