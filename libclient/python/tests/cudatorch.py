"""What the GPU test modules (test_gpu.py, test_fastpath_gpu.py) share: torch with a CUDA
device, else the importing module is skipped; the daemon on its CUDA backend (their
daemon_backend fixture); and the relative error of a result."""
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)

F = torch.nn.functional


@pytest.fixture(scope="module")
def daemon_backend():
    return "cuda"


def rel(a, b):
    """Relative L2 error of a against b, in float32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
