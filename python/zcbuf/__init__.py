"""zcbuf: zero-copy shared-memory buffers as NumPy arrays.

Make a buffer, view it as an array without copying, share it with other processes by name:

>>> import zcbuf
>>> buf = zcbuf.empty((1000, 1000), "f8", shared=True)
>>> a = buf.asarray()            # no copy: a view of the shared pages
>>> a[:] = 1.0
>>> other = zcbuf.open(buf.name)  # in this or any other process of the same user
>>> float(other.asarray().sum())
1000000.0

Arrays hold the memory: ``buf.free()`` retires the buffer but never breaks an array.
"""

from __future__ import annotations

from ._admin import ChannelState, Removed, Segment, gc, gc_report, ls, unlink
from ._buffer import Buffer, create, empty, from_array, from_dlpack, get, open, open_file, zeros
from ._share import SharedView, share
from ._channel import Publisher, Subscriber, publish, subscribe
from . import _errors
from ._errors import (
    AlreadyExistsError,
    CorruptError,
    Error,
    InternalError,
    InvalidArgumentError,
    IOFailedError,
    NotFoundError,
    OutOfMemoryError,
    PermissionDeniedError,
    ReadOnlyError,
    Timeout,
    ChannelClosed,
)

__version__ = "0.1.0"

__all__ = [
    "Buffer",
    "create",
    "empty",
    "zeros",
    "from_array",
    "from_dlpack",
    "share",
    "SharedView",
    "publish",
    "subscribe",
    "Publisher",
    "Subscriber",
    "open",
    "open_file",
    "get",
    "gc",
    "gc_report",
    "ls",
    "unlink",
    "Segment",
    "ChannelState",
    "Removed",
    *_errors.__all__,
]
