"""Sending views, not copies: :func:`share` turns an array over zcbuf memory into a handle.

A NumPy array pickles as a full copy of its data, so an array sent to a worker arrives as a
private copy and the worker's writes are lost. ``zcbuf.share(view)`` wraps a view of a shared or
file buffer (the whole array, a slice, a reshape, a strided or transposed view) in a small
handle that pickles as *where* the view is — the segment's name or the file's path, the byte
offset, shape, strides and dtype — and arrives in the receiver as an ndarray over the same
pages, writable when the sender's view was.
"""

from __future__ import annotations

import gc
from typing import Any, Optional, Tuple, Union

import numpy as np

from ._buffer import Buffer, _Mem, array_protocol, open, open_file
from ._errors import InvalidArgumentError, NotFoundError
from ._native import ffi

__all__ = ["SharedView", "share"]

_Spec = Tuple[str, str, bool, int, Tuple[int, ...], Tuple[int, ...], np.dtype]


def _origin(a: Any) -> Optional[_Mem]:
    """The zcbuf memory an array's pages belong to, by walking its ``base`` chain; or None."""
    o = a
    for _ in range(256):  # a chain of views is short; a cycle is impossible but bounded anyway
        if isinstance(o, _Mem):
            return o
        if isinstance(o, np.ndarray):
            o = o.base
        elif isinstance(o, memoryview):
            o = o.obj
        elif isinstance(o, Buffer):
            o = o._mem if o._mem is not None else o._keep
        else:
            return None
    return None


def _span(a: np.ndarray) -> Tuple[int, int]:
    """The bytes ``a`` touches, as [lo, hi) addresses."""
    lo = hi = a.__array_interface__["data"][0]
    if a.size:
        for n, st in zip(a.shape, a.strides):
            if st < 0:
                lo += (n - 1) * st
            else:
                hi += (n - 1) * st
        hi += a.itemsize
    return lo, hi


def _root_address(root: _Mem) -> Tuple[int, int]:
    base = int(ffi.cast("uintptr_t", ffi.from_buffer(root._export)))
    return base, base + len(memoryview(root._export))


def _origin_by_address(a: np.ndarray) -> Optional[_Mem]:
    """The zcbuf memory that contains ``a``'s bytes, for arrays whose ``base`` chain does not
    lead to it (made through DLPack, by torch, ...): the live mappings of this process are
    disjoint, so the one that contains the bytes is the one. A scan of the garbage collector's
    objects: milliseconds, done once per share() of such an array."""
    lo, hi = _span(a)
    for o in gc.get_objects():
        if type(o) is _Mem:
            b, e = _root_address(o)
            if b <= lo and hi <= e:
                return o
    return None


def _spec(a: np.ndarray) -> _Spec:
    """What the receiver needs to rebuild ``a``; raises when ``a`` cannot be sent as a view."""
    root = _origin(a)
    if root is None:
        root = _origin_by_address(a)
    if root is None:
        raise InvalidArgumentError(
            "this array is not a view of zcbuf memory, so it cannot be sent without a copy: "
            "make it with zcbuf (e.g. zcbuf.from_array(a, shared=True)) and share a view of that"
        )
    if root.kind == "private":
        raise InvalidArgumentError(
            "this array views a private zcbuf buffer, which other processes cannot map: "
            "create the buffer with shared=True (or a path) to send views of it"
        )
    if root.freed:
        raise NotFoundError(
            "this array views a buffer that was freed: it cannot be sent to another process "
            "(the name may be gone before the receiver opens it); share views before free()"
        )
    where = root.name if root.kind == "shared" else root.path
    assert where is not None
    base, end = _root_address(root)
    offset = a.__array_interface__["data"][0] - base
    lo, hi = _span(a)
    if lo < base or hi > end:  # not expected of a real view; checked so the receiver never is
        raise InvalidArgumentError(
            f"the array spans bytes {lo - base}..{hi - base} of a {end - base}-byte buffer: "
            "not a view of it"
        )
    readonly = root.readonly or not a.flags.writeable
    return (root.kind, where, readonly, offset, tuple(a.shape), tuple(a.strides), a.dtype)


def _rebuild(
    kind: str,
    where: str,
    readonly: bool,
    offset: int,
    shape: Tuple[int, ...],
    strides: Tuple[int, ...],
    dtype: np.dtype,
) -> np.ndarray:
    """The receiving end: open the segment or file, and view the same bytes the same way."""
    buf = open(where, readonly=readonly) if kind == "shared" else open_file(where, readonly=readonly)
    # The array's base is the buffer's memory, which holds the lease: the Buffer object itself
    # may go (and free its id) at once.
    return np.ndarray(shape, dtype, buffer=buf._mem, offset=offset, strides=strides)


class SharedView:
    """A picklable handle to a view of shared or file zcbuf memory; see :func:`share`.

    Pickled (to a worker through ``multiprocessing``, ``concurrent.futures``, a queue...), it
    arrives as an ``ndarray`` over the same pages with the same offset, shape, strides and dtype;
    here it behaves as the array it wraps (``np.asarray(handle)``, ``handle.array``).
    """

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        _spec(array)  # refuse now what could never be sent
        self.array = array

    def __reduce__(self) -> Any:
        # Checked again at pickling: the buffer may have been freed since share().
        return (_rebuild, _spec(self.array))

    def __array__(self, dtype: Any = None, copy: Optional[bool] = None) -> np.ndarray:
        return array_protocol(self.array, dtype, copy)

    def __repr__(self) -> str:
        kind, where, ro, off, shape, strides, dt = _spec(self.array)
        return (
            f"<zcbuf.SharedView {kind} {where!r} offset={off} shape={shape} strides={strides} "
            f"dtype={dt}{' readonly' if ro else ''}>"
        )


def share(obj: Union[np.ndarray, Buffer, "SharedView", Any]) -> Union["SharedView", Buffer]:
    """A handle that sends ``obj`` to another process as a view of the same pages, not a copy.

    ``obj`` is an array over a shared or file buffer, or any view of one (slice, reshape,
    transpose, strided view, ``view(dtype)``), also one made through DLPack or by another
    library (a torch tensor over zcbuf memory: it arrives as an ndarray — wrap it with
    ``torch.from_numpy`` there). The handle pickles as the buffer's name or path
    plus the view's offset, shape, strides and dtype, and unpickles as an ``ndarray`` over the
    same memory: the receiver's writes are seen by the sender (unless the view was read-only).
    A :class:`Buffer` already pickles as a handle and is returned as is.

    Raises :class:`InvalidArgumentError` for an array that is not zcbuf memory or views a
    private buffer, and :class:`NotFoundError` (here or when pickled) once its buffer was freed.

    >>> buf = zcbuf.empty((4, 1000), "f8", shared=True)
    >>> with ProcessPoolExecutor() as pool:
    ...     pool.map(fill_row, [zcbuf.share(row) for row in buf.asarray()])
    """
    if isinstance(obj, (Buffer, SharedView)):
        if isinstance(obj, Buffer) and obj.freed:
            raise obj._freed_error()
        return obj
    if not isinstance(obj, np.ndarray):
        if not hasattr(obj, "__dlpack__"):
            raise InvalidArgumentError(
                "zcbuf.share takes an array over zcbuf memory (NumPy, or any DLPack producer "
                f"such as a torch tensor) or a Buffer, not {type(obj).__name__}"
            )
        try:
            obj = np.from_dlpack(obj)  # a view, on the CPU: no copy
        except (BufferError, TypeError, RuntimeError) as e:
            raise InvalidArgumentError(
                f"zcbuf.share cannot view {type(obj).__name__} without a copy: {e}"
            ) from None
    return SharedView(obj)
