"""Exceptions: liteattn.Error and one subclass per LA_E* code of liteattn.h.

Every error carries .code (the negative LA_E* value), .name ("LA_EINVAL") and .message (the
daemon's or library's detail when there is one, else the code's text). Some subclasses are also
the matching Python built-in, so that `except ValueError` or `except ConnectionError` works.
"""
from . import _lib


class Error(Exception):
    """Base of every liteattn error."""
    code = 0
    name = "LA_UNKNOWN"

    def __init__(self, message="", code=None, name=None):
        if code is not None:
            self.code = code
        if name is not None:
            self.name = name
        self.message = message or _default_text(self.code)
        super().__init__("%s: %s" % (self.name, self.message))

    def __str__(self):
        return "%s: %s" % (self.name, self.message)

    def __reduce__(self):
        return (type(self), (self.message, self.code, self.name))


def _default_text(code):
    try:
        return _lib.text(_lib.get().la_strerror(code))
    except ImportError:
        return "error %d" % code


class InvalidArgument(Error, ValueError):
    code, name = _lib.LA_EINVAL, "LA_EINVAL"


class OutOfMemory(Error, MemoryError):
    code, name = _lib.LA_ENOMEM, "LA_ENOMEM"


class NotSupported(Error):
    code, name = _lib.LA_ENOTSUP, "LA_ENOTSUP"


class NotFound(Error, LookupError):
    code, name = _lib.LA_ENOENT, "LA_ENOENT"


class AlreadyExists(Error):
    code, name = _lib.LA_EEXIST, "LA_EEXIST"


class PermissionDenied(Error):
    code, name = _lib.LA_EPERM, "LA_EPERM"


class LimitReached(Error):
    code, name = _lib.LA_ELIMIT, "LA_ELIMIT"


class Busy(Error):
    code, name = _lib.LA_EBUSY, "LA_EBUSY"


class OutOfRange(Error, ValueError):
    code, name = _lib.LA_ERANGE, "LA_ERANGE"


class ProtocolError(Error):
    code, name = _lib.LA_EPROTO, "LA_EPROTO"


class VersionMismatch(Error):
    code, name = _lib.LA_EVERSION, "LA_EVERSION"


class ConnectionFailed(Error, ConnectionError):
    code, name = _lib.LA_ECONN, "LA_ECONN"


class ConnectionClosed(Error, ConnectionError):
    code, name = _lib.LA_ECLOSED, "LA_ECLOSED"


class Timeout(Error, TimeoutError):
    code, name = _lib.LA_ETIMEDOUT, "LA_ETIMEDOUT"


class NotReady(Error):
    code, name = _lib.LA_EAGAIN, "LA_EAGAIN"


class DeviceError(Error):
    code, name = _lib.LA_EDEVICE, "LA_EDEVICE"


class NoDevice(Error):
    code, name = _lib.LA_ENODEV, "LA_ENODEV"


class ShuttingDown(Error):
    code, name = _lib.LA_ESHUTDOWN, "LA_ESHUTDOWN"


class IOError_(Error):
    code, name = _lib.LA_EIO, "LA_EIO"


class InternalError(Error):
    code, name = _lib.LA_EINTERNAL, "LA_EINTERNAL"


_BY_CODE = {cls.code: cls for cls in (
    InvalidArgument, OutOfMemory, NotSupported, NotFound, AlreadyExists, PermissionDenied,
    LimitReached, Busy, OutOfRange, ProtocolError, VersionMismatch, ConnectionFailed,
    ConnectionClosed, Timeout, NotReady, DeviceError, NoDevice, ShuttingDown, IOError_,
    InternalError)}


def from_code(rc, detail=None):
    """The exception for a negative return code, with the thread's last error message."""
    lib = _lib.get()
    name = _lib.text(lib.la_err_name(rc))
    if detail is None:
        detail = _lib.text(lib.la_last_error_message())
    text = _lib.text(lib.la_strerror(rc))
    msg = detail if detail else text
    cls = _BY_CODE.get(rc, Error)
    return cls(msg, code=rc, name=name)


def check(rc):
    """Raises the matching Error for rc < 0; returns rc otherwise."""
    if rc < 0:
        raise from_code(rc)
    return rc
