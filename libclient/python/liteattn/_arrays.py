"""Array kinds (NumPy arrays, torch CPU and CUDA tensors) and how CUDA memory travels: dtype
codes of arrays, the session device that suits an array, PyTorch's expandable_segments check,
and libcuda's allocation ids that key the CUDA blocks a client registered (client.py)."""
import ctypes
import os

from . import _lib
from .errors import InvalidArgument

def _torch():
    import sys
    return sys.modules.get("torch")


def _is_torch(x):
    t = _torch()
    return t is not None and isinstance(x, t.Tensor)


def _np():
    import numpy
    return numpy


def _numpy_dtype_code(arr, session_dtype):
    np = _np()
    dt = arr.dtype
    if dt == np.float32:
        return _lib.DTYPE_F32
    if dt == np.float16:
        return _lib.DTYPE_F16
    if dt.name == "bfloat16" or (dt == np.uint16 and session_dtype == _lib.DTYPE_BF16):
        return _lib.DTYPE_BF16  # ml_dtypes.bfloat16, or raw bf16 bits in uint16
    raise InvalidArgument("NumPy dtype %s: use float32, float16, or uint16 holding bf16 bits "
                          "(with a session opened with dtype='bfloat16')" % dt)


def _torch_dtype_code(t):
    torch = _torch()
    m = {torch.float32: _lib.DTYPE_F32, torch.float16: _lib.DTYPE_F16,
         torch.bfloat16: _lib.DTYPE_BF16}
    try:
        return m[t.dtype]
    except KeyError:
        raise InvalidArgument("torch dtype %s: use float32, float16 or bfloat16" % t.dtype) \
            from None


def device_of(x):
    """The session device that suits array x: "cpu" for NumPy arrays and CPU tensors, the
    GPU's UUID ("GPU-...") for a CUDA tensor (or "cuda" when torch cannot tell it)."""
    if not (_is_torch(x) and x.is_cuda):
        return "cpu"
    try:
        u = str(_torch().cuda.get_device_properties(x.device).uuid)
        return u if u.startswith("GPU-") else "GPU-" + u
    except Exception:
        return "cuda"


def expandable_segments_enabled():
    """True when PyTorch's CUDA caching allocator runs with expandable_segments, whose memory
    cannot travel by legacy CUDA IPC."""
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        conf = os.environ.get(var, "").replace(" ", "").lower()
        if "expandable_segments:true" in conf:
            return True
    torch = _torch()
    if torch is not None:
        try:  # private, present in recent PyTorch; absent is fine
            settings = torch._C._accelerator_getAllocatorSettings()  # noqa: SLF001
            if "expandable_segments:true" in str(settings).lower().replace(" ", ""):
                return True
        except Exception:
            pass
    return False


_EXPANDABLE_MSG = (
    "this tensor comes from PyTorch's expandable_segments CUDA allocator "
    "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True), whose memory cannot be shared by "
    "legacy CUDA IPC; run without expandable_segments (unset it or set "
    "expandable_segments:False) to use liteattn with CUDA tensors")


class _CudaDriver:
    """cuPointerGetAttribute from libcuda, to key registered blocks by their allocation id."""
    BUFFER_ID = 7

    def __init__(self):
        self.fn = None
        try:
            dll = ctypes.CDLL("libcuda.so.1")
            self.fn = dll.cuPointerGetAttribute
            self.fn.restype = ctypes.c_int
            self.fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
        except (OSError, AttributeError):
            self.fn = None

    def buffer_id(self, ptr):
        if self.fn is None:
            return None
        v = ctypes.c_uint64(0)
        if self.fn(ctypes.byref(v), self.BUFFER_ID, ptr) != 0:
            return None
        return v.value


_driver = None


def _cuda_driver():
    global _driver
    if _driver is None:
        _driver = _CudaDriver()
    return _driver


class _CudaBlock:
    __slots__ = ("handle", "base", "size", "alloc_id")

    def __init__(self, handle, base, size, alloc_id):
        self.handle, self.base, self.size, self.alloc_id = handle, base, size, alloc_id
