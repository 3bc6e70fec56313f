"""Array kinds (NumPy arrays, torch CPU and CUDA tensors) and how CUDA memory travels: dtype
codes of arrays, the session device that suits an array, PyTorch's expandable_segments check,
libcuda's allocation ids that key the CUDA blocks a client registered, and the staging area
for CUDA memory that cannot be shared (client.py)."""
import ctypes
import math
import os

from . import _lib
from .errors import InvalidArgument, NotSupported

_ALIGN = 256


def _align(n):
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _prod(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n

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
    """True when PyTorch's CUDA caching allocator runs with expandable_segments: its memory
    (cuMemCreate) travels by POSIX fds instead of legacy CUDA IPC (see docs/ALLOCATORS.md)."""
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


class StagingWarning(RuntimeWarning):
    """CUDA tensors are copied through a staging area: their memory cannot be shared."""


_STAGING_WARNED = set()


class _Unshareable(Exception):
    """Private: the memory of a CUDA tensor cannot be registered (the library's message)."""


class _CudaDriver:
    """cuPointerGetAttribute from libcuda (to key registered blocks by their allocation id and
    tell legacy memory from VMM), and cuMemAlloc/cuMemFree for the staging area."""
    BUFFER_ID = 7
    IS_LEGACY_CUDA_IPC_CAPABLE = 10

    def __init__(self):
        self.fn = self.alloc = self.free = None
        try:
            dll = ctypes.CDLL("libcuda.so.1")
            self.fn = dll.cuPointerGetAttribute
            self.fn.restype = ctypes.c_int
            self.fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
            self.alloc = dll.cuMemAlloc_v2
            self.alloc.restype = ctypes.c_int
            self.alloc.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
            self.free = dll.cuMemFree_v2
            self.free.restype = ctypes.c_int
            self.free.argtypes = [ctypes.c_uint64]
        except (OSError, AttributeError):
            self.fn = self.alloc = self.free = None

    def buffer_id(self, ptr):
        if self.fn is None:
            return None
        v = ctypes.c_uint64(0)
        if self.fn(ctypes.byref(v), self.BUFFER_ID, ptr) != 0:
            return None
        return v.value

    def is_vmm(self, ptr):
        """True for memory legacy CUDA IPC cannot share (cuMemCreate, e.g. expandable
        segments); False for cudaMalloc memory or when the driver cannot tell."""
        if self.fn is None:
            return False
        v = ctypes.c_uint32(1)  # the driver writes a bool: start from "legacy"
        if self.fn(ctypes.byref(v), self.IS_LEGACY_CUDA_IPC_CAPABLE, ptr) != 0:
            return False
        return v.value & 0xff == 0


def _storage_span(t):
    """(address, bytes) of the storage under tensor t (so that views of one storage share a
    registration), or of t's own extent when the storage cannot be asked."""
    try:
        st = t.untyped_storage()
        if st.nbytes() > 0:
            return st.data_ptr(), st.nbytes()
    except Exception:
        pass
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        n += (int(size) - 1) * int(stride)
    return t.data_ptr(), max(1, n * t.element_size())


class _CudaArray:
    """A device range as a __cuda_array_interface__ object (torch.as_tensor wraps it)."""

    def __init__(self, ptr, nbytes):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (ptr, False), "version": 3, "strides": None,
                                         "stream": None}


class _CudaStage:
    """Staging area of one client on one device for CUDA tensors whose memory cannot be
    shared: ordinary device memory (cuMemAlloc, shared by CUDA IPC), grown as calls need, the
    inputs copied in and the outputs copied out on the caller's stream. An event recorded
    after the last copy out orders the next call's copies in, whatever stream it uses."""

    def __init__(self, device):
        self.device = device
        self.ptr = 0
        self.size = 0
        self.u8 = None
        self.done = None  # torch.cuda.Event after the last copy out

    def ensure(self, nbytes):
        torch = _torch()
        if self.size >= nbytes:
            return
        drv = _cuda_driver()
        if drv.alloc is None:
            raise NotSupported("cannot allocate a CUDA staging area: libcuda.so.1 lacks "
                               "cuMemAlloc_v2")
        if self.done is not None:
            self.done.synchronize()
        self.release()
        size = max(1 << 20, 1 << max(0, math.ceil(math.log2(nbytes))))
        p = ctypes.c_uint64(0)
        with torch.cuda.device(self.device):
            torch.cuda.current_stream(self.device)  # the primary context, current here
            rc = drv.alloc(ctypes.byref(p), size)
        if rc != 0 or not p.value:
            raise MemoryError("cannot allocate a CUDA staging area of %d bytes on %s (cuMemAlloc "
                              "error %d)" % (size, self.device, rc))
        self.ptr, self.size = p.value, size
        self.u8 = torch.as_tensor(_CudaArray(self.ptr, size), device=self.device)

    def release(self):
        if self.ptr:
            self.u8 = None
            _cuda_driver().free(self.ptr)
            self.ptr, self.size = 0, 0

    def views(self, specs):
        """Contiguous tensors in the staging area, one per (shape, dtype) of specs."""
        total, offs = 0, []
        for shape, dtype in specs:
            offs.append(total)
            n = _prod(shape) * _torch().empty((), dtype=dtype).element_size()
            total += _align(n)
        self.ensure(total)
        out = []
        for (shape, dtype), off in zip(specs, offs):
            n = _prod(shape) * _torch().empty((), dtype=dtype).element_size()
            out.append(self.u8[off:off + n].view(dtype).view(tuple(shape)))
        return out


_driver = None


def _cuda_driver():
    global _driver
    if _driver is None:
        _driver = _CudaDriver()
    return _driver


class _CudaBlock:
    __slots__ = ("handle", "base", "size", "alloc_id", "access")

    def __init__(self, handle, base, size, alloc_id, access=_lib.ACCESS_RW):
        self.handle, self.base, self.size, self.alloc_id = handle, base, size, alloc_id
        self.access = access
