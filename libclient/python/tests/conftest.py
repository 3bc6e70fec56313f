"""Fixtures: a liteattnd on a temporary socket per test module (CPU backend unless a test
module asks for another through `daemon_backend`), and a Client connected to it.

The package is imported from the source tree (libclient/python) and finds build/libliteattn.so
by itself; everything skips with a clear reason when build/liteattnd or the library is absent
(run `make` first). $LITEATTN_DAEMON overrides the daemon binary.
"""
import os
import signal
import socket as pysocket
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_ROOT = os.path.dirname(HERE)                      # libclient/python
REPO = os.path.abspath(os.path.join(PKG_ROOT, "..", ".."))
if PKG_ROOT not in sys.path:
    sys.path.insert(0, PKG_ROOT)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

DAEMON = os.environ.get("LITEATTN_DAEMON") or os.path.join(REPO, "build", "liteattnd")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU, torch with CUDA and a daemon "
                                       "with the CUDA backend (skipped otherwise)")


def _library_reason():
    try:
        import liteattn
        liteattn.library_path()
    except ImportError as e:
        return str(e)
    return None


def _wait_accept(path, proc, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if os.path.exists(path):
            s = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
            try:
                s.connect(path)
                return True
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.02)
    return False


class Daemon:
    def __init__(self, backend, extra=()):
        self.dir = tempfile.mkdtemp(prefix="liteattn-pytest-")
        self.socket = os.path.join(self.dir, "liteattn.sock")
        self.log_path = os.path.join(self.dir, "daemon.log")
        self.backend = backend
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [DAEMON, "--socket", self.socket, "--backend", backend, "--foreground"]
            + list(extra), stdout=self._log, stderr=subprocess.STDOUT)
        if not _wait_accept(self.socket, self.proc):
            self.stop(check=False)
            raise RuntimeError("liteattnd did not start (backend %s):\n%s"
                               % (backend, self.log()))

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-4000:]
        except OSError:
            return ""

    def stop(self, check=True):
        rc = self.proc.poll()
        if rc is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
        self._log.close()
        log = self.log()
        for name in os.listdir(self.dir):
            try:
                os.unlink(os.path.join(self.dir, name))
            except OSError:
                pass
        try:
            os.rmdir(self.dir)
        except OSError:
            pass
        if check:
            assert rc == 0, "liteattnd exited with status %s:\n%s" % (rc, log)
        return rc


@pytest.fixture(scope="module")
def daemon_backend():
    return "cpu"


@pytest.fixture(scope="module")
def daemon(daemon_backend):
    if not os.access(DAEMON, os.X_OK):
        pytest.skip("%s is missing: run `make` first (or set LITEATTN_DAEMON)" % DAEMON)
    reason = _library_reason()
    if reason:
        pytest.skip(reason)
    d = Daemon(daemon_backend)
    yield d
    d.stop(check=True)


@pytest.fixture
def client(daemon):
    import liteattn
    c = liteattn.Client(daemon.socket)
    yield c
    c.close()


@pytest.fixture
def cclient(client):
    """The client, for a module whose daemon_backend is "cuda": skips when the daemon has no
    CUDA backend."""
    if "cuda" not in client.backends:
        pytest.skip("the daemon has no CUDA backend (backends: %s)" % client.backends)
    return client


@pytest.fixture
def rng(request):
    import zlib
    import numpy as np
    seed = zlib.crc32(request.node.name.encode())
    return np.random.default_rng(seed)
