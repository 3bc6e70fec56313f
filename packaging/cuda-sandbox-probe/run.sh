#!/bin/bash
# Runs the CUDA sandbox probe (probe.c) under each emulated part of liteattnd.service's sandbox
# on a GPU host, as root. Every variant must end in "== result: ok".
#
# allow.h (x86_64 syscall numbers of SystemCallFilter=@system-service minus @privileged) was
# generated on Debian 12 (systemd 252) with `./run.sh --gen-allow`, which needs systemd-analyze
# and the kernel headers.
set -u
cd "$(dirname "$0")"
if [ "${1:-}" = --gen-allow ]; then
    python3 - <<'PY'
import re, subprocess
def group(g):
    out = subprocess.run(["systemd-analyze", "syscall-filter", g], capture_output=True,
                         text=True, check=True).stdout
    names = set()
    for line in out.splitlines():
        t = line.strip()
        if t.startswith("@") and t != g:
            names |= group(t)
        elif t and not t.startswith(("#", "@")):
            names.add(t)
    return names
allow = group("@system-service") - group("@privileged")
nums = {}
for line in open("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"):
    m = re.match(r"#define __NR_(\w+) (\d+)", line)
    if m:
        nums[m.group(1)] = int(m.group(2))
got = sorted(nums[n] for n in allow if n in nums)
with open("allow.h", "w") as f:
    f.write("/* x86_64 numbers of @system-service minus @privileged (systemd-analyze) */\n")
    f.write("static const int allow_nrs[] = {%s};\n" % ",".join(map(str, got)))
PY
    exit
fi
cc -O1 -Wall -o probe probe.c -ldl || exit 1
grep -h . /proc/driver/nvidia/version 2>/dev/null | head -1
grep -i nvidia /proc/devices
status=0
for v in "" "--user" "--user --nnp" "--user --seccomp --af-unix" "--user --mdwe" \
         "--ro-sys --hidepid --user --seccomp --af-unix"; do
    timeout 120 ./probe $v 2>&1 || status=1
done
rm -f probe
exit $status
