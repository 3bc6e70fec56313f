#!/usr/bin/env bash
# bench/run_gpu.sh — builds what the CUDA kernel benchmark needs (unless a carried build is
# there), runs the kernel's Check program, then bench/bench_gpu.py (prints the table last).
#   bench/run_gpu.sh [--quick] [--no-check]        OUT=dir keeps the logs and the JSON
# Environment: CUDA_ARCHS (default: this GPU's), BUILD (default build).
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
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
# kernels/ objects need only nvcc and cc: build them (and the test, when Check is there).
targets=("$BUILD/libla_kernels.so")
[ "$run_check" = 1 ] && targets+=("$BUILD/tests/check_gpu_kernel")
if ! make -q CUDA_ARCHS="$CUDA_ARCHS" BUILD="$BUILD" "${targets[@]}" 2>/dev/null; then
    for t in "${targets[@]}"; do
        [ -e "$t" ] && continue  # carried from a machine that has Check / protoc-c
        make -j"$(nproc)" CUDA_ARCHS="$CUDA_ARCHS" BUILD="$BUILD" "$t"
    done
fi
if [ "$run_check" = 1 ]; then
    set -o pipefail
    "$BUILD/tests/check_gpu_kernel" 2>&1 | tee "$OUT/check_gpu_kernel.log" | grep -E "^[0-9]+%|:[0-9]+:[EF]:|seed|live fraction" || true
    tail -n 1 "$OUT/check_gpu_kernel.log"
fi
PYTHONUNBUFFERED=1 OUT="$OUT" python3 bench/bench_gpu.py --lib "$BUILD/libla_kernels.so" "${args[@]}" \
    2>&1 | tee "$OUT/bench_gpu.log"
