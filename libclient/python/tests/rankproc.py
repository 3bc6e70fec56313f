"""Waiting for the rank processes of the multi-process tests (test_parallel.py,
test_diffusers_parallel.py)."""
import subprocess
import time

import pytest


def wait_ranks(procs, limit_s):
    """The output of each of procs (started with stdout=PIPE, stderr=STDOUT), once all have exited
    with status 0. Fails the test, killing those still running, when they have not all finished
    limit_s seconds after the call, and fails it with their logs when one exited otherwise."""
    t0, logs = time.monotonic(), []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, limit_s - (time.monotonic() - t0)))
            logs.append(out.decode("utf-8", "replace"))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        pytest.fail("the %d ranks did not finish in %g s" % (len(procs), limit_s))
    bad = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    assert not bad, "ranks failed %s:\n%s" % (bad, "\n".join(logs)[-6000:])
    return logs
