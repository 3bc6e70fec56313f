#!/usr/bin/env bash
# bench/run_gpu_sm90.sh — issue 9 (the Hopper kernel) on a GPU machine, in one call:
#   smoke     the small cases once, with a short timeout (stops everything on a hang);
#   daemon    check_gpu_daemon, check_engine, bench_daemon at B1 H40 S32760 D128;
#   sweep     bench_gpu.py --sweep on each ${AB:-build/ab}/*.so, one process each;
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
# Cases time out after a fifth of their Check limit here: a hang must not eat the lease.
export CK_TIMEOUT_MULTIPLIER=${CK_TIMEOUT_MULTIPLIER:-0.2}

if has smoke; then
    echo "== smoke: the small cases once (60 s), nothing else runs if they hang"
    CK_RUN_CASE=sanitize CK_FORK=no timeout 60 "$T" >"$OUT/smoke.log" 2>&1
    rc=$?
    grep -E ':[EF]:|Checks' "$OUT/smoke.log" | head -n 20
    if [ $rc = 124 ]; then echo "smoke: HANG"; exit 1; fi
fi

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
if has daemon; then
    echo "== daemon: GPU daemon and engine tests, daemon path against a direct call (Wan shape)"
    export LD_LIBRARY_PATH="$PWD/$BUILD${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    progs=("$BUILD/tests/check_gpu_daemon")
    [ -x "$BUILD/tests/check_engine" ] && progs+=("$BUILD/tests/check_engine")
    BUILD=$BUILD tests/run.sh "${progs[@]}" >"$OUT/daemon.log" 2>&1
    grep -E '^(==|[0-9]+%|tests:)|:[EF]:' "$OUT/daemon.log"
    summary+=("daemon tests: $(tail -n 1 "$OUT/daemon.log")")
    dir=$(mktemp -d)
    "$BUILD/liteattnd" --socket "$dir/s" --backend cuda --log-level warn 2>>"$OUT/daemon.log" &
    dpid=$!
    for _ in $(seq 100); do [ -S "$dir/s" ] && break; sleep 0.05; done
    "$BUILD/bench_daemon" --socket "$dir/s" --device cuda --iters 20 --heads 40 --seq 32760 --head-dim 128 \
        >>"$OUT/daemon.log" 2>&1
    kill -TERM $dpid; wait $dpid
    tail -n 8 "$OUT/daemon.log"
fi
if has sweep; then
    echo "== sweep: kernel builds of build/ab/*.so, one process each (torch flash as the common row)"
    for lib in ${AB:-build/ab}/*.so; do
        PYTHONUNBUFFERED=1 timeout 150 python3 bench/bench_gpu.py --quick --sweep "$lib" 2>&1 | tee -a "$OUT/sweep.log" | grep -E 'sweep B'
    done
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
