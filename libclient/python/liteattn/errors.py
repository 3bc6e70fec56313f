"""Exceptions: liteattn.Error and one subclass per LA_E* code of liteattn.h.

Every error carries .code (the negative LA_E* value), .name ("LA_EINVAL") and .message (the
daemon's or library's detail when there is one, else the code's text). Some subclasses are also
the matching Python built-in, so that `except ValueError` or `except ConnectionError` works.
"""
from . import _lib


_BY_CODE = {}  # code -> its subclass of Error, filled as they are defined


class Error(Exception):
    """Base of every liteattn error."""
    code = 0
    name = "LA_UNKNOWN"

    def __init_subclass__(cls, la_name=None, **kwargs):
        """`class NotFound(Error, LookupError, la_name="LA_ENOENT")` sets the subclass's .name
        and .code (from _lib) and makes it from_code()'s class for that code."""
        super().__init_subclass__(**kwargs)
        if la_name is not None:
            cls.name, cls.code = la_name, getattr(_lib, la_name)
            _BY_CODE[cls.code] = cls

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


class InvalidArgument(Error, ValueError, la_name="LA_EINVAL"):
    pass


class OutOfMemory(Error, MemoryError, la_name="LA_ENOMEM"):
    pass


class NotSupported(Error, la_name="LA_ENOTSUP"):
    pass


class NotFound(Error, LookupError, la_name="LA_ENOENT"):
    pass


class AlreadyExists(Error, la_name="LA_EEXIST"):
    pass


class PermissionDenied(Error, la_name="LA_EPERM"):
    pass


class LimitReached(Error, la_name="LA_ELIMIT"):
    pass


class Busy(Error, la_name="LA_EBUSY"):
    pass


class OutOfRange(Error, ValueError, la_name="LA_ERANGE"):
    pass


class ProtocolError(Error, la_name="LA_EPROTO"):
    pass


class VersionMismatch(Error, la_name="LA_EVERSION"):
    pass


class ConnectionFailed(Error, ConnectionError, la_name="LA_ECONN"):
    pass


class ConnectionClosed(Error, ConnectionError, la_name="LA_ECLOSED"):
    pass


class Timeout(Error, TimeoutError, la_name="LA_ETIMEDOUT"):
    pass


class NotReady(Error, la_name="LA_EAGAIN"):
    pass


class DeviceError(Error, la_name="LA_EDEVICE"):
    pass


class NoDevice(Error, la_name="LA_ENODEV"):
    pass


class ShuttingDown(Error, la_name="LA_ESHUTDOWN"):
    pass


class IOError_(Error, la_name="LA_EIO"):
    pass


class InternalError(Error, la_name="LA_EINTERNAL"):
    pass


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
