"""liteattn — Python client of the liteattn daemon (LiteAttention temporal sparse attention).

Core API (NumPy arrays and torch tensors, CPU through shared memory, CUDA through IPC):

    import numpy as np, liteattn
    with liteattn.Client() as c:                      # default socket, or Client("/path.sock")
        s = c.open_session("my-gen", layers=1, heads=8, head_dim=64, dtype="float32",
                           max_seq_q=1024, threshold=-3.0)
        out = s.attention(0, step, q, k, v)          # q, k, v: (B, S, H, D)

Drop-in module: liteattn.LiteAttention (see liteattn.module). diffusers: liteattn.diffusers.
The shared library is found through $LITEATTN_LIB, next to this package, in the source
checkout's build/ directory, or on the system path.
"""
from .client import (Client, Session, DTYPES, MODES, StagingWarning, device_of,
                     expandable_segments_enabled, threshold_tag, warm_key)
from .errors import (Error, InvalidArgument, OutOfMemory, NotSupported, NotFound, AlreadyExists,
                     PermissionDenied, LimitReached, Busy, OutOfRange, ProtocolError,
                     VersionMismatch, ConnectionFailed, ConnectionClosed, Timeout, NotReady,
                     DeviceError, NoDevice, ShuttingDown, IOError_, InternalError)
from .module import (LiteAttention, Context, default_context, new_generation, generation,
                     convert_must_list)
from .dtypes import float32_to_bf16, bf16_to_float32
from . import order

__version__ = "0.1.0"


def library_path():
    """Path of the loaded libliteattn."""
    from . import _lib
    return _lib.get().path


def library_version():
    """The C library's version string."""
    from . import _lib
    return _lib.text(_lib.get().la_version())


def default_socket_path():
    return Client.default_socket_path()


_log_cb = None


def enable_library_log(enabled=True):
    """Forwards libliteattn's own messages (dropped connections, failed unmaps) to the Python
    logger "liteattn.lib"; enabled=False silences them again (the default)."""
    global _log_cb
    import logging
    from . import _lib
    lib = _lib.get()
    if not enabled:
        lib.la_set_log(_lib.LOG_FN(), None)
        _log_cb = None
        return
    logger = logging.getLogger("liteattn.lib")
    levels = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}

    def cb(user, level, message):
        try:
            logger.log(levels.get(level, logging.DEBUG), "%s", _lib.text(message))
        except Exception:
            pass
    _log_cb = _lib.LOG_FN(cb)
    lib.la_set_log(_log_cb, None)
