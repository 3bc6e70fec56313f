#!/usr/bin/env bash
# make demo: start liteattnd on a temporary socket, run liteattn-demo through it, stop it.
# With a GPU the daemon's auto backend picks CUDA and the demo runs a realistic size
# (preset wan480: 40 heads x 128, S 32760); otherwise a small CPU generation.
# Extra arguments go to liteattn-demo.
set -euo pipefail
BUILD=${BUILD:-build}
dir=$(mktemp -d "${TMPDIR:-/tmp}/liteattn-demo.XXXXXX")
sock="$dir/liteattn.sock"
daemon_pid=
cleanup() {
    if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    rm -rf "$dir"
}
trap cleanup EXIT

"$BUILD/liteattnd" --socket "$sock" --backend "${LA_DEMO_BACKEND:-auto}" \
    --log-level warn 2>"$dir/daemon.log" &
daemon_pid=$!
for _ in $(seq 1 200); do
    [ -S "$sock" ] && "$BUILD/liteattnctl" --socket "$sock" ping -n 1 >/dev/null 2>&1 && break
    if ! kill -0 "$daemon_pid" 2>/dev/null; then
        echo "liteattnd failed to start:" >&2; cat "$dir/daemon.log" >&2; exit 1
    fi
    sleep 0.05
done
"$BUILD/liteattnctl" --socket "$sock" status

args=()
if "$BUILD/liteattnctl" --socket "$sock" status | grep -q 'cuda'; then
    args+=(--device cuda --preset wan480)
fi
"$BUILD/liteattn-demo" --socket "$sock" "${args[@]}" "$@"

kill -TERM "$daemon_pid"
status=0
wait "$daemon_pid" || status=$?
daemon_pid=
if [ "$status" -ne 0 ]; then
    echo "liteattnd exited with status $status:" >&2; cat "$dir/daemon.log" >&2; exit 1
fi
