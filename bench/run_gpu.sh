#!/usr/bin/env bash
# bench/run_gpu.sh — the CUDA kernel benchmark of issue 4 in one go, on a GPU machine:
#   1. builds $BUILD/libla_kernels.so (kernels/ objects need only nvcc and cc) unless present;
#   2. runs $BUILD/tests/check_gpu_kernel (the kernel against the CPU reference) when it is
#      there or can be built (it needs Check: where Check is missing, build it elsewhere with
#      `make PORTABLE=1 CUDA_ARCHS=90 BUILD=... $BUILD/tests/check_gpu_kernel` and bring it);
#   3. runs bench/bench_gpu.py (torch SDPA side by side) and prints its table last.
# Usage: bench/run_gpu.sh [--quick] [--no-check] [--skip-drift]
# Environment: BUILD (default build), OUT (logs and JSON, default $BUILD/bench-out),
# CUDA_ARCHS (default: this GPU's), LA_COMMIT (commit named in the table; default git's).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
OUT=${OUT:-$BUILD/bench-out}
mkdir -p "$OUT"
run_check=1 args=()
for a in "$@"; do
    case "$a" in --no-check) run_check=0 ;; *) args+=("$a") ;; esac
done
if [ -z "${CUDA_ARCHS:-}" ]; then
    CUDA_ARCHS=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d .)
fi
export LA_COMMIT=${LA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"

[ -e "$BUILD/libla_kernels.so" ] || make -j"$(nproc)" CUDA_ARCHS="$CUDA_ARCHS" BUILD="$BUILD" "$BUILD/libla_kernels.so"
if [ "$run_check" = 1 ]; then
    if [ -e "$BUILD/tests/check_gpu_kernel" ] ||
        make -j"$(nproc)" CUDA_ARCHS="$CUDA_ARCHS" BUILD="$BUILD" "$BUILD/tests/check_gpu_kernel"; then
        "$BUILD/tests/check_gpu_kernel" >"$OUT/check_gpu_kernel.log" 2>&1 || true
        grep -E ':[EF]:|live fraction' "$OUT/check_gpu_kernel.log" || true
        grep -E '^[0-9]+%: Checks' "$OUT/check_gpu_kernel.log" || echo "check_gpu_kernel: no summary (see $OUT/check_gpu_kernel.log)"
    else
        echo "note: could not build $BUILD/tests/check_gpu_kernel (Check missing?): kernel checks not run"
    fi
fi
PYTHONUNBUFFERED=1 OUT="$OUT" python3 bench/bench_gpu.py --lib "$BUILD/libla_kernels.so" ${args[@]+"${args[@]}"} \
    2>&1 | tee "$OUT/bench_gpu.log"
