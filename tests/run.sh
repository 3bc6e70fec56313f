#!/usr/bin/env bash
# Runs every Check program given on the command line and prints one closing line:
#   tests: N passed, N failed, N skipped
# The counts come from the files the programs write (tests/runner.h): Check's own XML log
# ($LA_TEST_RESULTS/<program>.xml: one <test result="..."> per case run) and the number of
# GPU cases left out by tag on a machine without a GPU (<program>.skipped). A program that
# exits non-zero without a failed case in its log (a crash outside the cases, a missing log)
# counts as one failure. Then the Python tests, counted from pytest's JUnit XML. Exit status 1
# if anything failed.
set -u
passed=0 failed=0 skipped=0 bad_progs=()
results=$(mktemp -d "${TMPDIR:-/tmp}/liteattn-tests.XXXXXX")
trap 'rm -rf "$results"' EXIT

# Occurrences of an exact string in a file (0 when absent).
count() { grep -o -- "$1" "$2" 2>/dev/null | wc -l; }

for prog in "$@"; do
    name=$(basename "$prog")
    echo "== $name"
    t_prog=$SECONDS
    LA_TEST_RESULTS="$results" "$prog"
    rc=$?
    echo "   $name: $((SECONDS - t_prog)) s"
    xml="$results/$name.xml"
    if [ ! -s "$xml" ]; then
        echo "!! $name wrote no Check log (exit $rc)"
        failed=$((failed + 1)); bad_progs+=("$name"); continue
    fi
    ok=$(count '<test result="success">' "$xml")
    bad=$(( $(count '<test result="failure">' "$xml") + $(count '<test result="error">' "$xml") ))
    sk=$(cat "$results/$name.skipped" 2>/dev/null || echo 0)
    [ "$sk" -gt 0 ] && echo "   $name: $sk GPU case(s) skipped (no GPU)"
    passed=$((passed + ok)); failed=$((failed + bad)); skipped=$((skipped + sk))
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
    junit="$results/pytest-$(echo "$pydir" | tr / _).xml"
    t_prog=$SECONDS
    "$py" -m pytest -q -rs -p no:cacheprovider --durations=5 --junitxml="$junit" "$pydir"
    rc=$?
    echo "   pytest $pydir: $((SECONDS - t_prog)) s"
    # <testsuite ... errors="E" failures="F" skipped="S" tests="T" ...>
    attr() { grep -o "<testsuite [^>]*" "$junit" 2>/dev/null | grep -o " $1=\"[0-9]*\"" |
             head -n 1 | grep -o '[0-9]*' || echo 0; }
    t=$(attr tests); f=$(attr failures); e=$(attr errors); s_=$(attr skipped)
    passed=$((passed + t - f - e - s_)); failed=$((failed + f + e)); skipped=$((skipped + s_))
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
        bad_progs+=("pytest:$pydir")
        [ $((f + e)) -eq 0 ] && failed=$((failed + 1))
    fi
done
[ ${#bad_progs[@]} -gt 0 ] && echo "failing programs: ${bad_progs[*]}"
echo "tests: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
