#!/usr/bin/env bash
# bench/run_gpu_sm90.sh — issue 9 (the Hopper kernel) on a GPU machine, in one call:
#   tests     the kernel tests with the Hopper family selected, then with LA_CUDA_PORTABLE=1;
#   sanitize  compute-sanitizer memcheck, racecheck and synccheck on the small cases
#             (CK_RUN_CASE=sanitize);
#   bench     bench/bench_gpu.py (ours, the portable kernel, cuDNN, flash, a bf16 GEMM and FA3
#             when FA3_PATH holds a build of it, interleaved in one process);
#   quick     bench on small shapes instead.
# Parts are named on the command line (default: tests sanitize bench). The binaries come from
# a build made elsewhere: `make PORTABLE=1 CUDA_ARCHS=90 BUILD=build/gpu
# build/gpu/tests/check_gpu_kernel build/gpu/libla_kernels.so`.
# Environment: BUILD (default build/gpu), OUT (logs; at most 8 files are written there).
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build/gpu}
OUT=${OUT:-$BUILD/sm90-out}
mkdir -p "$OUT"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests sanitize bench)
has() { local p; for p in "${parts[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }
summary=()
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
T=$BUILD/tests/check_gpu_kernel

if has tests; then
    echo "== kernel tests, default selection"
    timeout 420 "$T" >"$OUT/check_default.log" 2>&1
    grep -E ':[EF]:|cc 9.0|differ|ties [1-9]' "$OUT/check_default.log" | head -n 30
    summary+=("default: $(grep -E '^[0-9]+%: Checks' "$OUT/check_default.log" | tail -n 1)")
    echo "== kernel tests, LA_CUDA_PORTABLE=1"
    LA_CUDA_PORTABLE=1 timeout 420 "$T" >"$OUT/check_portable.log" 2>&1
    grep -E ':[EF]:' "$OUT/check_portable.log" | head -n 20
    summary+=("portable: $(grep -E '^[0-9]+%: Checks' "$OUT/check_portable.log" | tail -n 1)")
fi
if has sanitize; then
    : >"$OUT/sanitizer.log"
    for tool in memcheck racecheck synccheck; do
        echo "== compute-sanitizer --tool $tool (CK_RUN_CASE=sanitize)" | tee -a "$OUT/sanitizer.log"
        CK_RUN_CASE=sanitize CK_FORK=no timeout 300 compute-sanitizer --tool "$tool" --error-exitcode 99 \
            "$T" >>"$OUT/sanitizer.log" 2>&1
        rc=$?
        tail -n 3 "$OUT/sanitizer.log"
        summary+=("$tool: exit $rc, $(grep -E '^========= (ERROR SUMMARY|RACECHECK SUMMARY)' "$OUT/sanitizer.log" | tail -n 1)")
    done
fi
if has bench || has quick; then
    args=(--skip-drift)
    has quick && args+=(--quick)
    PYTHONUNBUFFERED=1 OUT="$OUT" timeout 500 python3 bench/bench_gpu.py --lib "$BUILD/libla_kernels.so" \
        "${args[@]}" >"$OUT/bench_gpu.log" 2>&1
    summary+=("bench: exit $?")
    sed -n '/^== /,$p' "$OUT/bench_gpu.log"
    grep -E 'FAIL|Error|error' "$OUT/bench_gpu.log" | head -n 10
fi
echo "== summary"
printf '%s\n' "${summary[@]}"
