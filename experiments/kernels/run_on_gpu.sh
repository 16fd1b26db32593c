#!/usr/bin/env bash
# The GPU runs of issues 3 and 4, one subcommand per device call (each call starts a bare machine).
#
#   bash experiments/kernels/run_on_gpu.sh STEP [STEP ...]     from the repository root, with $OUT set
#
# Steps: tests (compiled `gpu` kernel tests), slow-tests (the `gpu` + `slow` ones: index offsets past 2**31,
# t = 131072), attention, sscan, ssd, ssu (the benchmarks, each with a time budget or a fixed size), profile-OP
# (Nsight Compute on one op: profile-swa, profile-selective_scan, profile-ssd). Wheels the GPU image lacks
# (ml_collections, tfds, grain, ...) are installed from ./.whl when that folder exists (carry it to the machine).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false
quiet() { grep -v "bfc_allocator\|hlo_rematerialization\|Allocator\|allocation summary\|\*\*\*\|TF_GPU_ALLOCATOR"; }
for step in "$@"; do
  case $step in
    tests)
      python3 -m pytest -q -m gpu -o addopts="-ra" -p no:cacheprovider tests/pallas_kernels 2>&1 | tail -15 \
        | tee "$OUT/gpu_tests.log" ;;
    slow-tests)
      # One process per file: the SSD test needs ~45 GB of a fresh allocator (it ran out of memory after the
      # selective-scan ones, and at JAX's default 75% memory fraction).
      for f in test_selective_scan test_ssd; do
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python3 -m pytest -v -m gpu --runslow -o addopts="-ra" \
          -p no:cacheprovider "tests/pallas_kernels/$f.py" -k "large_offsets or past_int32 or 131072" 2>&1 \
          | grep -E "PASSED|FAILED|ERROR|passed|failed" | tee -a "$OUT/gpu_slow_tests.log"
      done ;;
    attention)
      python3 experiments/kernels/attention.py --out "$OUT/attention" --budget-s 300 2>&1 | quiet \
        | tee "$OUT/attention.log" | tail -25 ;;
    sscan)
      python3 experiments/kernels/ssm_selective_scan.py --out "$OUT/sscan" --budget-s 300 2>&1 | quiet \
        | tee "$OUT/sscan.log" | tail -25 ;;
    ssd)
      python3 experiments/kernels/ssm_ssd.py --out "$OUT/ssd" --budget-s 300 2>&1 | quiet \
        | tee "$OUT/ssd.log" | tail -25 ;;
    ssu)
      # Default tiles at batch 1, 16, 64, then the block_p x num_warps sweep at batch 16 only (a few minutes).
      (python3 experiments/kernels/ssm_state_update.py --out "$OUT/ssu" \
        && python3 experiments/kernels/ssm_state_update.py --out "$OUT/ssu_sweep" --sweep --batches 16) 2>&1 | quiet \
        | tee "$OUT/ssu.log" | tail -60 ;;
    profile-*)
      op=${step#profile-}
      (cd experiments/kernels && ncu --clock-control none --kernel-name "regex:${op/swa/sliding_window}" \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
        python3 profile_once.py --op "$op" --iters 1) > "$OUT/ncu_$op.txt" 2>&1
      grep -E "^  [a-z_]+ \(|Duration|Registers Per|Waves Per SM|Achieved Occupancy" "$OUT/ncu_$op.txt" ;;
    *) echo "unknown step: $step" >&2; exit 2 ;;
  esac
done
