#!/usr/bin/env bash
# bench/run_gpu_all.sh — everything of liteattn that needs a GPU, in one call on the GPU machine:
#   1. the GPU test programs (kernel against the CPU reference; daemon with the CUDA backend and
#      two IPC clients against direct kernel calls; the engine's GPU case);
#   2. `make demo`'s generation on the GPU (preset wan480);
#   3. the daemon path against a direct kernel call (bench_daemon) at two sizes, synchronous and
#      on the fast path (--fast: issue 10's figure on the client's GPU timeline), and the
#      throughput of 2 and 4 client processes against one (bench_throughput);
#   4. the Python package's GPU tests (torch CUDA tensors by IPC against SDPA; diffusers Wan);
#   5. optionally (--wan) the diffusers Wan2.1-sized transformer, SDPA against liteattn;
#   6. optionally (--fastpath-loop) bench_fastpath.py: 40 layers x 50 steps at B1 H40 S32760
#      D128 through the Python module against the kernel in process (about 4 minutes).
# The binaries come from a build made elsewhere (the GPU machine lacks libuv, protobuf-c and
# Check): `make PORTABLE=1 CUDA_ARCHS=90 BUILD=build/gpu all build/gpu/tests/check_gpu_kernel
# build/gpu/tests/check_gpu_daemon build/gpu/tests/check_engine build/gpu/bench_daemon
# build/gpu/bench_throughput build/gpu/libla_kernels.so` and
# libprotobuf-c.so.1 copied next to libliteattn.so. Wheels for diffusers in .whl/ if present.
# Environment: BUILD (default build/gpu), OUT (logs, default $BUILD/gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build/gpu}
OUT=${OUT:-$BUILD/gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/$BUILD${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
wan=0 loop=0
for a in "$@"; do
    [ "$a" = --wan ] && wan=1
    [ "$a" = --fastpath-loop ] && loop=1
done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
summary=()

echo "== 1. GPU tests"
BUILD=$BUILD tests/run.sh "$BUILD/tests/check_gpu_kernel" "$BUILD/tests/check_gpu_daemon" \
    "$BUILD/tests/check_engine" 2>&1 | tee "$OUT/tests.log" | grep -E '^(==|[0-9]+%|tests:)|:[EF]:'
summary+=("tests: $(tail -n 1 "$OUT/tests.log")")

echo "== 2. demo (wan480 preset on the GPU)"
BUILD=$BUILD timeout 300 libclient/tools/run-demo.sh 2>&1 | tee "$OUT/demo.log" | tail -n 26
summary+=("demo: $(grep -E '^summary' "$OUT/demo.log" | tail -n 1)")

echo "== 3. daemon path against a direct call"
dir=$(mktemp -d)
"$BUILD/liteattnd" --socket "$dir/s" --backend cuda --log-level warn 2>"$OUT/daemon3.log" &
dpid=$!
for _ in $(seq 100); do [ -S "$dir/s" ] && break; sleep 0.05; done
for shape in "--heads 8 --seq 1024 --head-dim 64" "--heads 40 --seq 32760 --head-dim 128"; do
    "$BUILD/bench_daemon" --socket "$dir/s" --device cuda --iters 50 --fast $shape 2>&1 | tee -a "$OUT/bench_daemon.log"
done
for shape in "--heads 8 --seq 1024 --head-dim 64 --calls 2000" "--heads 40 --seq 32760 --head-dim 128 --calls 20"; do
    "$BUILD/bench_throughput" --socket "$dir/s" --procs 2,4 $shape 2>&1 | tee -a "$OUT/bench_throughput.log"
done
"$BUILD/liteattnctl" --socket "$dir/s" ping -n 1000 | tee -a "$OUT/bench_daemon.log"
kill -TERM $dpid; wait $dpid; echo "daemon exit $?"
summary+=("$(grep -E 'added by the daemon|fast path added' "$OUT/bench_daemon.log" | tr '\n' ' ')")
summary+=("throughput: $(grep -E 'processes, a session each' "$OUT/bench_throughput.log" | tr -s ' ' | tr '\n' ';')")

echo "== 4. Python GPU tests"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export LITEATTN_LIB="$PWD/$BUILD/libliteattn.so" LITEATTN_DAEMON="$PWD/$BUILD/liteattnd"
export LITEATTN_BUILD_DIR="$PWD/$BUILD"
PYTHONUNBUFFERED=1 timeout 400 python3 -m pytest -q -p no:cacheprovider libclient/python/tests \
    -m gpu -rs 2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 15
summary+=("pytest gpu: $(tail -n 1 "$OUT/pytest_gpu.log")")

if [ "$wan" = 1 ]; then
    echo "== 5. diffusers Wan transformer, SDPA against liteattn"
    PYTHONUNBUFFERED=1 timeout 420 python3 libclient/python/examples/bench_wan.py \
        --daemon "$BUILD/liteattnd" --json "$OUT/bench_wan.json" 2>&1 | tee "$OUT/bench_wan.log" | tail -n 25
fi

if [ "$loop" = 1 ]; then
    echo "== 6. Wan-sized loop through the Python module against the kernel in process"
    PYTHONUNBUFFERED=1 timeout 540 python3 bench/bench_fastpath.py --daemon "$BUILD/liteattnd" \
        --lib "$BUILD/libla_kernels.so" --json "$OUT/bench_fastpath.json" 2>&1 | tee "$OUT/bench_fastpath.log"
    summary+=("$(grep -E 'through liteattn / in process' "$OUT/bench_fastpath.log")")
fi

echo "== summary"
printf '%s\n' "${summary[@]}"
