"""Private: loads libliteattn.so and declares the C functions of liteattn.h used by the package.

The C API is opaque handles and scalar setters, so nothing here mirrors a C struct: every
handle is a c_void_p and every setter takes scalars, strings or int64/float arrays.

Where the library is looked for, first hit wins:
  1. $LITEATTN_LIB (a file path),
  2. next to this package (liteattn/libliteattn.so*),
  3. the build tree of the source checkout this package sits in or was installed from
     (<repo>/build/libliteattn.so, i.e. ../../build relative to libclient/python),
  4. the system: ctypes.util.find_library("liteattn"), then dlopen("libliteattn.so.0").
"""
import ctypes
import ctypes.util
import os
from ctypes import (CFUNCTYPE, POINTER, c_char_p, c_double, c_float, c_int, c_int64, c_size_t,
                    c_uint32, c_uint64, c_void_p)

_HERE = os.path.dirname(os.path.abspath(__file__))

# Error codes (liteattn.h LA_ERRNO_MAP). Only used for control flow here; names and messages
# always come from the library (la_err_name, la_strerror).
LA_EINVAL = -1
LA_ENOMEM = -2
LA_ENOTSUP = -3
LA_ENOENT = -4
LA_EEXIST = -5
LA_EPERM = -6
LA_ELIMIT = -7
LA_EBUSY = -8
LA_ERANGE = -9
LA_EPROTO = -10
LA_EVERSION = -11
LA_ECONN = -12
LA_ECLOSED = -13
LA_ETIMEDOUT = -14
LA_EAGAIN = -15
LA_EDEVICE = -16
LA_ENODEV = -17
LA_ESHUTDOWN = -18
LA_EIO = -19
LA_EINTERNAL = -20

DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_U32 = 0, 1, 2, 3
WARM_DEFAULT = 0xFFFFFFFF  # LA_WARM_DEFAULT
MODE_SESSION, MODE_DENSE, MODE_OBSERVE, MODE_SKIP = 0, 1, 2, 3
DIR_ALTERNATE, DIR_ASCENDING, DIR_DESCENDING = 0, 1, 2
T_Q, T_K, T_V, T_O, T_LSE, T_DECISIONS, T_ROW_MAX = 0, 1, 2, 3, 4, 5, 6
ACCESS_READ, ACCESS_WRITE, ACCESS_RW = 1, 2, 3

LOG_FN = CFUNCTYPE(None, c_void_p, c_int, c_char_p)
DONE_FN = CFUNCTYPE(None, c_void_p, c_int, c_void_p)

_P = c_void_p
_PP = POINTER(c_void_p)
_I64P = POINTER(c_int64)
_U64P = POINTER(c_uint64)

# name: (restype, argtypes)
_FUNCS = {
    "la_strerror": (c_char_p, [c_int]),
    "la_err_name": (c_char_p, [c_int]),
    "la_last_error_message": (c_char_p, []),
    "la_set_log": (None, [LOG_FN, c_void_p]),
    "la_version": (c_char_p, []),
    "la_default_socket_path": (c_int, [ctypes.c_char_p, c_size_t]),
    "la_connect": (c_int, [c_char_p, c_char_p, _PP]),
    "la_disconnect": (None, [_P]),
    "la_client_property": (c_char_p, [_P, c_char_p]),
    "la_ping": (c_int, [_P, _U64P]),
    "la_client_process": (c_int, [_P, c_int]),
    "la_table_rows": (c_size_t, [_P]),
    "la_table_cols": (c_size_t, [_P]),
    "la_table_col_name": (c_char_p, [_P, c_size_t]),
    "la_table_text": (c_char_p, [_P, c_size_t, c_size_t]),
    "la_table_free": (None, [_P]),
    "la_stats": (c_int, [_P, _PP]),
    "la_sessions": (c_int, [_P, _PP]),
    "la_buffer_new_host": (c_int, [_P, c_size_t, _PP]),
    "la_buffer_register_cuda": (c_int, [_P, c_void_p, _PP, _U64P]),
    "la_buffer_register_cuda_range": (c_int, [_P, c_void_p, c_uint64, c_uint32, _PP, _U64P]),
    "la_buffer_cuda_valid": (c_int, [_P]),
    "la_buffer_host_ptr": (c_void_p, [_P]),
    "la_buffer_size": (c_uint64, [_P]),
    "la_buffer_id": (c_uint64, [_P]),
    "la_buffer_unregister": (c_int, [_P]),
    "la_session_config_new": (c_int, [_PP]),
    "la_session_config_free": (None, [_P]),
    "la_session_config_set_geometry": (c_int, [_P, c_uint32, c_uint32, c_uint32, c_int,
                                               c_uint32, c_uint32, c_uint32, c_uint32]),
    "la_session_config_set_threshold": (c_int, [_P, c_float]),
    "la_session_config_set_schedule": (c_int, [_P, POINTER(c_float), c_size_t]),
    "la_session_config_set_mode": (c_int, [_P, c_int]),
    "la_session_config_set_direction": (c_int, [_P, c_int]),
    "la_session_config_set_device": (c_int, [_P, c_char_p]),
    "la_session_config_set_warm_start": (c_int, [_P, c_char_p, c_uint32, c_uint32, c_uint32,
                                                 c_uint32]),
    "la_session_config_set_guard": (c_int, [_P, c_uint32, c_uint32, c_float]),
    "la_session_text": (c_char_p, [_P, c_char_p]),
    "la_session_stat": (c_int, [_P, c_char_p, _I64P]),
    "la_warm_list": (c_int, [_P, _PP]),
    "la_warm_drop": (c_int, [_P, c_char_p, _U64P]),
    "la_session_open": (c_int, [_P, c_char_p, _P, _PP]),
    "la_session_attach": (c_int, [_P, c_char_p, _PP]),
    "la_session_get": (c_int, [_P, c_char_p, _I64P]),
    "la_session_info": (c_int, [_P, POINTER(c_double), c_size_t, _U64P]),
    "la_session_read_mask": (c_int, [_P, c_uint32, c_uint32, c_void_p, c_size_t]),
    "la_session_reset": (c_int, [_P]),
    "la_session_close": (c_int, [_P]),
    "la_session_detach": (None, [_P]),
    "la_attn_new": (c_int, [_PP]),
    "la_attn_free": (None, [_P]),
    "la_attn_set_tensor": (c_int, [_P, c_int, _P, c_uint64, c_int, c_int, _I64P, _I64P]),
    "la_attn_set_position": (c_int, [_P, c_uint32, c_uint32, c_uint32]),
    "la_attn_set_scale": (c_int, [_P, c_float]),
    "la_attn_set_threshold": (c_int, [_P, c_float]),
    "la_attn_set_mode": (c_int, [_P, c_int]),
    "la_attn_set_must_do": (c_int, [_P, _I64P, c_size_t]),
    "la_attn_set_must_skip": (c_int, [_P, _I64P, c_size_t]),
    "la_attn_set_dry_run": (c_int, [_P, c_int]),
    "la_attn_set_wait_event": (c_int, [_P, c_void_p, c_size_t]),
    "la_attn_run": (c_int, [_P, _P, _PP]),
    "la_call_wait": (c_int, [_P, c_int]),
    "la_call_status": (c_int, [_P]),
    "la_call_stat": (c_int, [_P, c_char_p, _I64P]),
    "la_call_done_event": (c_int, [_P, c_void_p, c_size_t]),
    "la_call_free": (None, [_P]),
    "la_session_fastpath": (c_int, [_P]),
    "la_attn_enqueue": (c_int, [_P, _P, c_void_p, _PP]),
    "la_session_sync": (c_int, [_P, c_int]),
    "la_client_sync": (c_int, [_P, c_int]),
    "la_session_counter": (c_int, [_P, c_char_p, _I64P]),
}


def _candidates():
    env = os.environ.get("LITEATTN_LIB")
    if env:
        yield env
        return
    for name in sorted(os.listdir(_HERE)):
        if name.startswith("libliteattn.so"):
            yield os.path.join(_HERE, name)
    roots = [os.path.join(_HERE, "..", "..", "..")]  # liteattn/ -> python/ -> libclient/ -> repo
    try:
        from . import _install_info  # written by setup.py at install time
        roots.append(os.path.join(_install_info.SOURCE_DIR, "..", ".."))
    except ImportError:
        pass
    for root in roots:
        build = os.environ.get("LITEATTN_BUILD_DIR") or os.path.join(root, "build")
        for name in ("libliteattn.so", "libliteattn.so.0"):
            p = os.path.normpath(os.path.join(build, name))
            if os.path.exists(p):
                yield p
    found = ctypes.util.find_library("liteattn")
    if found:
        yield found
    yield "libliteattn.so.0"


class _Lib:
    """The loaded library; attributes are the declared C functions."""

    def __init__(self):
        self.path = None
        self.dll = None
        self.error = None

    def load(self):
        if self.dll is not None:
            return self
        tried = []
        for path in _candidates():
            try:
                dll = ctypes.CDLL(path)
            except OSError as e:
                tried.append("%s (%s)" % (path, e))
                continue
            missing = [n for n in _FUNCS if not hasattr(dll, n)]
            if missing:
                tried.append("%s (lacks %s)" % (path, ", ".join(missing)))
                continue
            for name, (res, args) in _FUNCS.items():
                f = getattr(dll, name)
                f.restype = res
                f.argtypes = args
                setattr(self, name, f)
            self.dll, self.path = dll, path
            return self
        raise ImportError(
            "liteattn: cannot load libliteattn.so; build it with `make` in the source tree, "
            "install it (`make install`), or point $LITEATTN_LIB at it. Tried: "
            + "; ".join(tried))


lib = _Lib()


def get():
    """The loaded library (loads it on first use)."""
    return lib.load()


def text(p):
    return p.decode("utf-8", "replace") if p else ""
