#!/usr/bin/env bash
# Runs every Check program given on the command line and prints one closing line:
#   tests: N passed, N failed, N skipped
# GPU programs (check_gpu_*) are skipped, and their cases counted as skipped, when this machine
# has no NVIDIA GPU (no /dev/nvidiactl, or LA_TEST_NO_GPU=1). Exit status 1 if anything failed.
set -u
passed=0 failed=0 skipped=0 bad_progs=()
have_gpu=0
if [ "${LA_TEST_NO_GPU:-0}" != 1 ] && [ -e /dev/nvidiactl ]; then have_gpu=1; fi
for prog in "$@"; do
    name=$(basename "$prog")
    src="tests/$name.c"
    if [[ "$name" == check_gpu_* ]] && [ "$have_gpu" = 0 ]; then
        n=$(grep -c 'tcase_add_test' "$src" 2>/dev/null || echo 0)
        echo "== $name: skipped, no GPU ($n cases)"
        skipped=$((skipped + n))
        continue
    fi
    echo "== $name"
    log=$(mktemp)
    "$prog" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    line=$(grep -E '^[0-9]+%: Checks: [0-9]+' "$log" | tail -n 1)
    rm -f "$log"
    if [ -z "$line" ]; then
        echo "!! $name printed no Check summary (exit $rc)"
        failed=$((failed + 1)); bad_progs+=("$name"); continue
    fi
    checks=$(sed -E 's/.*Checks: ([0-9]+).*/\1/' <<<"$line")
    fails=$(sed -E 's/.*Failures: ([0-9]+).*/\1/' <<<"$line")
    errs=$(sed -E 's/.*Errors: ([0-9]+).*/\1/' <<<"$line")
    bad=$((fails + errs))
    passed=$((passed + checks - bad)); failed=$((failed + bad))
    if [ "$bad" -gt 0 ] || [ "$rc" -ne 0 ]; then bad_progs+=("$name"); fi
    if [ "$bad" -eq 0 ] && [ "$rc" -ne 0 ]; then failed=$((failed + 1)); fi
done
# Python tests (libclient/python/tests), folded into the same closing line; $PYTHON (make
# check PYTHON=...) picks the interpreter, python3 by default.
py=${PYTHON:-python3}
for pydir in ${LA_PYTEST_DIRS:-}; do
    [ -d "$pydir" ] || continue
    if ! "$py" -c 'import pytest, numpy' 2>/dev/null; then
        echo "== pytest $pydir: not run ($py lacks pytest or numpy: sudo apt-get install python3-numpy python3-pytest, see README.md)"
        failed=$((failed + 1)); bad_progs+=("pytest:$pydir"); continue
    fi
    if ! "$py" -c 'import torch' 2>/dev/null; then
        echo "== note: $py has no torch: the PyTorch and diffusers tests are skipped (README.md, \"Quick start\", says how to run them)"
    elif ! "$py" -c 'import diffusers' 2>/dev/null; then
        echo "== note: $py has no diffusers: the diffusers tests are skipped"
    fi
    echo "== pytest $pydir ($py)"
    log=$(mktemp)
    "$py" -m pytest -q -rs -p no:cacheprovider "$pydir" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    summary=$(grep -E '(passed|failed|skipped|error|no tests ran)' "$log" | tail -n 1)
    rm -f "$log"
    p=$(grep -oE '[0-9]+ passed' <<<"$summary" | grep -oE '[0-9]+' || echo 0)
    f=$(grep -oE '[0-9]+ failed' <<<"$summary" | grep -oE '[0-9]+' || echo 0)
    e=$(grep -oE '[0-9]+ errors?' <<<"$summary" | grep -oE '[0-9]+' || echo 0)
    s_=$(grep -oE '[0-9]+ skipped' <<<"$summary" | grep -oE '[0-9]+' || echo 0)
    passed=$((passed + p)); failed=$((failed + f + e)); skipped=$((skipped + s_))
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
        bad_progs+=("pytest:$pydir")
        [ $((f + e)) -eq 0 ] && failed=$((failed + 1))
    fi
done
[ ${#bad_progs[@]} -gt 0 ] && echo "failing programs: ${bad_progs[*]}"
echo "tests: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
