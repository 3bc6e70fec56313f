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
    LA_TEST_RESULTS="$results" "$prog"
    rc=$?
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
# Python tests (libclient/python/tests), folded into the same closing line.
for pydir in ${LA_PYTEST_DIRS:-}; do
    [ -d "$pydir" ] || continue
    if ! python3 -c 'import pytest, numpy' 2>/dev/null; then
        echo "== pytest $pydir: not run (python3 lacks pytest or numpy; pip install -r .ci/requirements.txt)"
        failed=$((failed + 1)); bad_progs+=("pytest:$pydir"); continue
    fi
    echo "== pytest $pydir"
    junit="$results/pytest-$(echo "$pydir" | tr / _).xml"
    python3 -m pytest -q -p no:cacheprovider --junitxml="$junit" "$pydir"
    rc=$?
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
