"""The exception classes of zcbuf and the one place that turns a C status into one."""

from __future__ import annotations

from ._native import ffi, lib

__all__ = [
    "Error",
    "InvalidArgumentError",
    "NotFoundError",
    "AlreadyExistsError",
    "OutOfMemoryError",
    "PermissionDeniedError",
    "ReadOnlyError",
    "CorruptError",
    "IOFailedError",
    "InternalError",
    "Timeout",
    "ChannelClosed",
]


class Error(Exception):
    """Base class of every zcbuf error. ``status`` is the C status code."""

    status: int = 0


class InvalidArgumentError(Error, ValueError):
    """A malformed argument: bad name, shape or dtype that does not fit, unknown flag."""

    status = lib.ZCBUF_EINVAL


class NotFoundError(Error, LookupError):
    """No buffer, segment or file by that id, name or path (or it was freed)."""

    status = lib.ZCBUF_ENOTFOUND


class AlreadyExistsError(Error, FileExistsError):
    """A segment or file by that name or path already exists."""

    status = lib.ZCBUF_EEXIST


class OutOfMemoryError(Error, MemoryError):
    """Not enough memory, shared memory (/dev/shm) or disk space."""

    status = lib.ZCBUF_ENOMEM


class PermissionDeniedError(Error, PermissionError):
    """The operating system refused access."""

    status = lib.ZCBUF_EPERM


class ReadOnlyError(Error, PermissionError):
    """A write was asked of something opened or mounted read-only."""

    status = lib.ZCBUF_EREADONLY


class CorruptError(Error, ValueError):
    """Not a zcbuf buffer, a damaged header, or a header of another version."""

    status = lib.ZCBUF_ECORRUPT


class IOFailedError(Error, OSError):
    """Another operating-system I/O failure."""

    status = lib.ZCBUF_EIO


class InternalError(Error, RuntimeError):
    """A bug in zcbuf; please report it with the message."""

    status = lib.ZCBUF_EINTERNAL


class Timeout(Error, TimeoutError):
    """A bounded wait ran out: a channel's timeout, a buffer that did not come in time, or
    another process holding a segment's lock for too long."""

    status = lib.ZCBUF_ETIMEDOUT


class ChannelClosed(Error, EOFError):
    """A channel's stream ended: its publisher closed it or died, and every message it sent
    before was received. Iterating over a subscriber stops here."""

    status = lib.ZCBUF_ECLOSED


_BY_STATUS: dict[int, type[Error]] = {
    cls.status: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        OutOfMemoryError,
        PermissionDeniedError,
        ReadOnlyError,
        CorruptError,
        IOFailedError,
        InternalError,
        Timeout,
        ChannelClosed,
    )
}


# Shown as ``zcbuf.NotFoundError`` (where users catch them), not ``zcbuf._errors.NotFoundError``.
for _cls in (Error, *_BY_STATUS.values()):
    _cls.__module__ = "zcbuf"


def last_error() -> str:
    """This thread's last error message from the native library."""
    buf = ffi.new("char[]", 1024)
    n = lib.zcbuf_last_error(buf, 1024)
    if n >= 1024:
        buf = ffi.new("char[]", n + 1)
        lib.zcbuf_last_error(buf, n + 1)
    return str(ffi.string(buf).decode("utf-8", "replace"))


def check(status: int) -> None:
    """Raise the exception for a nonzero native status (call in the thread that got it)."""
    if status:
        cls = _BY_STATUS.get(status, InternalError)
        msg = last_error()
        # The native message starts with its kind ("not found: ..."), which the exception's
        # class already says: say each thing once.
        kind = ffi.string(lib.zcbuf_status_name(status)).decode("ascii", "replace") + ": "
        if msg.startswith(kind):
            msg = msg[len(kind):]
        raise cls(msg)
