"""Buffers and the functions that make them."""

from __future__ import annotations

import math
import operator
import os
import time
import re
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from . import _dtype
from ._errors import (
    AlreadyExistsError,
    CorruptError,
    Error,
    InvalidArgumentError,
    NotFoundError,
    Timeout,
    check,
    last_error,
)
from ._export import NATIVE, ExportBase
from ._native import ffi, lib

__all__ = ["Buffer", "create", "empty", "zeros", "from_array", "from_dlpack", "open", "open_file", "get"]

PathLike = Union[str, "os.PathLike[str]"]
ShapeLike = Union[int, Sequence[int]]

_KIND_NAMES = {
    lib.ZCBUF_KIND_PRIVATE: "private",
    lib.ZCBUF_KIND_SHARED: "shared",
    lib.ZCBUF_KIND_FILE: "file",
}


# Bound once: attribute look-ups on cffi's lib object are measurable on the open path.
_new = ffi.new
_gc = ffi.gc
_ffi_buffer = ffi.buffer
_acquire_info = lib.zcbuf_acquire_info
_free = lib.zcbuf_free
_rel = lib.zcbuf_release
_SHARED = lib.ZCBUF_KIND_SHARED
_FILE = lib.ZCBUF_KIND_FILE
_frombuffer = np.frombuffer
_unpack = ffi.unpack
_string = ffi.string
_open_acquire = lib.zcbuf_open_shared_acquire
_OPENED_T = ffi.typeof("zcbuf_opened_t *")
_new_object = object.__new__
_READ_ONLY = lib.ZCBUF_READ_ONLY
_U8 = np.dtype(np.uint8)
# Parsed header dtypes by their text: opening the same kind of buffer again skips the parse.
_DTYPES: "dict[bytes, np.dtype]" = {}


class _Mem(ExportBase):  # type: ignore[misc, valid-type]
    """The root of every array made from one lease: exports its bytes, says where they live.

    Arrays made by :class:`Buffer` are built on this object (``np.frombuffer(mem)``), so
    walking an array's ``.base`` chain ends here, and :func:`zcbuf.share` learns which segment
    or file the array's pages belong to, and whether its buffer was freed. ``_export`` (read by the buffer
    protocol) is the cffi buffer over the lease, read-only when the mapping is.
    """

    __slots__ = ("_export", "_export_bytes", "kind", "name", "path", "readonly", "freed")

    if not NATIVE:  # pragma: no cover - not CPython: PEP 688 (3.12+) is the only route

        def __buffer__(self, flags: int) -> memoryview:
            return memoryview(self._export)


def _root(mem: Any, kind: str, name: Optional[str], path: Optional[str], readonly: bool) -> Any:
    r = _new_object(_Mem)
    r._export = r._export_bytes = mem
    r.kind = kind
    r.name = name
    r.path = path
    r.readonly = readonly
    r.freed = False  # set by Buffer.free(): views of it then refuse to be shared
    return r


def array_protocol(a: np.ndarray, dtype: Any, copy: Optional[bool]) -> np.ndarray:
    """NumPy's ``__array__(dtype, copy)`` contract over ``a``: a conversion or ``copy=True``
    copies; ``copy=False`` never does (a conversion is then a ``ValueError``)."""
    if dtype is not None and np.dtype(dtype) != a.dtype:
        if copy is False:
            raise ValueError(f"converting {a.dtype} to {np.dtype(dtype)} needs a copy, but copy=False")
        return a.astype(dtype)
    return a.copy() if copy else a


def _descr_loses(dt: np.dtype) -> bool:
    try:
        return bool(np.dtype(dt.descr) != dt)
    except (TypeError, ValueError):
        return True


def _release(id_: int) -> Any:
    def release(_cdata: Any) -> None:
        _rel(id_)

    return release


def _text(fn: Any, id_: int) -> str:
    n = ffi.new("size_t *")
    check(fn(id_, ffi.NULL, 0, n))
    buf = ffi.new("char[]", n[0] + 1)
    check(fn(id_, buf, n[0] + 1, n))
    return str(ffi.string(buf).decode("utf-8", "surrogateescape"))


class Buffer(ExportBase):  # type: ignore[misc, valid-type]
    """A buffer of memory owned by zcbuf: private, shared by name, or a mapped file.

    A ``Buffer`` holds one lease on the memory for as long as it or any array made from it is
    alive, so :meth:`free` never invalidates an array: it retires the id, and the memory is
    unmapped when the last array (and every view of it) is garbage-collected.

    >>> buf = zcbuf.empty((2, 3), "f4", shared=True)
    >>> a = buf.asarray(); a[:] = 1
    >>> zcbuf.open(buf.name).asarray().sum()
    6.0
    """

    __slots__ = (
        "_id",
        "_nbytes",
        "_kind",
        "_readonly",
        "_name",
        "_path",
        "_dtype",
        "_shape",
        "_mem",
        "_default",
        "_owned",
        "_persistent",
        "_keep",
        "__weakref__",
    )

    def __init__(self, id_: int, *, owned: bool, name: Optional[str] = None, path: Optional[str] = None) -> None:
        """Wrap registry id ``id_``; ``owned`` buffers are freed when garbage-collected.

        Use :func:`create`, :func:`empty`, :func:`open`, :func:`open_file` or :func:`get`
        rather than calling this directly.
        """
        self._owned = False  # set last: __del__ must not free what a failed __init__ did not own
        self._mem = None
        info = _new("zcbuf_info_t *")
        ptr = _new("uint8_t **")
        n = _new("size_t *")
        status = _acquire_info(id_, ptr, n, info)
        if status:
            if owned:  # we were handed ownership of the id: do not leak it
                _free(id_)
            check(status)
        try:
            kind = info.kind
            if kind == _SHARED and name is None:
                name = _text(lib.zcbuf_name, id_)
            elif kind == _FILE and path is None:
                path = _text(lib.zcbuf_path, id_)
            dtype_text = _text(lib.zcbuf_dtype, id_).encode("ascii", "replace") if info.dtype_len else b""
            shape: Tuple[int, ...] = ()
            if info.dtype_len:
                dims = _new("uint64_t[]", max(info.ndim, 1))
                nd = _new("uint32_t *")
                check(lib.zcbuf_shape(id_, dims, info.ndim, nd))
                shape = tuple(_unpack(dims, nd[0]))
        except BaseException:
            _rel(id_)
            if owned:
                _free(id_)
            raise
        self._setup(id_, ptr[0], int(n[0]), info, dtype_text, shape, name, path, owned)

    def _setup(
        self,
        id_: int,
        ptr: Any,
        n: int,
        info: Any,
        dtype_text: bytes,
        shape: Tuple[int, ...],
        name: Optional[str],
        path: Optional[str],
        owned: bool,
    ) -> None:
        """Finish construction over one lease already taken on ``id_`` (at ``ptr``, ``n`` bytes).

        On failure the lease is given back and, when ``owned``, the id freed: nothing leaks.
        """
        self._owned = False
        self._mem = None
        try:
            # Everything that can fail on what the header says comes first, before anything
            # refers to the memory: a failure then gives the lease (and, when owned, the id)
            # back at once, whoever keeps the exception.
            dt: Optional[np.dtype] = None
            if dtype_text:
                dt = _DTYPES.get(dtype_text)
                if dt is None:
                    dt = _dtype.decode(dtype_text.decode("ascii", "replace"))
                    if dt.hasobject or dt.subdtype is not None or dt.itemsize == 0:
                        raise CorruptError(
                            f"the stored dtype {dtype_text.decode('ascii', 'replace')!r} cannot "
                            "describe shared memory (object, sub-array or empty dtype)"
                        )
                    if len(_DTYPES) < 4096:
                        _DTYPES[dtype_text] = dt
                if dt.itemsize != info.itemsize:
                    raise CorruptError(
                        f"stored dtype {dt} has item size {dt.itemsize}, "
                        f"but the header says {info.itemsize}"
                    )
            # The lease is released when the last reference to this cdata goes: the Buffer's and
            # those of every array made from it (through ffi.buffer -> memoryview -> ndarray).
            cdata = _gc(ptr, _release(id_))
        except BaseException:
            _rel(id_)
            if owned:
                _free(id_)
            raise
        kind = info.kind
        try:
            mem: Any = _ffi_buffer(cdata, n)
            if info.readonly:
                mem = memoryview(mem).toreadonly()
            mem = _root(
                mem,
                _KIND_NAMES.get(kind, "unknown"),
                name if kind == _SHARED else None,
                path if kind == _FILE else None,
                bool(info.readonly),
            )
            if dt is not None:
                count = 1
                for d in shape:
                    count *= d
                dflt = _frombuffer(mem, dt, count).reshape(shape)
            else:
                dflt = _frombuffer(mem, _U8)
        except BaseException as e:
            # Give the lease back now rather than when the traceback is collected.
            mem = dflt = None
            ffi.release(cdata)
            if owned:
                _free(id_)
            if isinstance(e, Exception) and not isinstance(e, Error):
                raise CorruptError(f"buffer {id_} cannot be viewed as its stored type: {e}") from None
            raise
        self._id = id_
        self._nbytes = n
        self._kind = _KIND_NAMES.get(kind, "unknown")
        self._readonly = bool(info.readonly)
        self._persistent = bool(info.persistent)
        self._name = name if kind == _SHARED else None
        self._path = path if kind == _FILE else None
        self._dtype: Optional[np.dtype] = dt
        self._shape: Optional[Tuple[int, ...]] = shape if dt is not None else None
        # The default array, made once; asarray() hands out views of it (about 0.1 µs).
        self._default: Optional[np.ndarray] = dflt
        self._mem = mem
        self._keep = None
        self._owned = owned

    def __del__(self) -> None:
        # Policy: a buffer this object owns (created or opened here) is freed when collected;
        # arrays made from it keep its memory mapped until they are collected too.
        try:
            if self._owned and self._mem is not None:
                self._mem = None
                _free(self._id)
        except Exception:  # noqa: BLE001 - never raise from a finalizer (e.g. at shutdown)
            pass

    # -- properties -------------------------------------------------------------------------

    @property
    def id(self) -> int:
        """The registry id (usable from C and Rust in this process)."""
        return self._id

    @property
    def nbytes(self) -> int:
        """Data length in bytes."""
        return self._nbytes

    @property
    def kind(self) -> str:
        """``"private"``, ``"shared"`` or ``"file"``."""
        return self._kind

    @property
    def name(self) -> Optional[str]:
        """The shared-memory name (shared buffers), else ``None``."""
        return self._name

    @property
    def path(self) -> Optional[str]:
        """The file path (file buffers), else ``None``."""
        return self._path

    @property
    def dtype(self) -> Optional[np.dtype]:
        """The stored dtype, or ``None`` for raw bytes."""
        return self._dtype

    @property
    def shape(self) -> Optional[Tuple[int, ...]]:
        """The stored shape, or ``None`` for raw bytes."""
        return self._shape

    @property
    def readonly(self) -> bool:
        """True when mapped read-only: arrays are not writeable and cannot be made so."""
        return self._readonly

    @property
    def persistent(self) -> bool:
        """True for a shared buffer created with ``persist=True``: it outlives its last holder
        until :func:`zcbuf.unlink` removes it."""
        return self._persistent

    @property
    def freed(self) -> bool:
        """True after :meth:`free` (arrays made before stay valid)."""
        return self._mem is None

    @property
    def sealed(self) -> bool:
        """True when this shared buffer's segment is sealed (by :meth:`seal` in any process; also
        for a buffer opened after the seal). Asks the kernel each time, so a buffer opened before
        another process sealed it sees the seal too. False for private and file buffers;
        :class:`NotFoundError` after :meth:`free`."""
        if self._mem is None:
            raise self._freed_error()
        info = _new("zcbuf_info_t *")
        check(lib.zcbuf_info(self._id, info))
        return bool(info.sealed)

    def seal(self) -> None:
        """Make this shared buffer immutable: call it once the data is complete.

        Every later open of the segment, in any process, maps it read-only (also
        ``open(name)`` without ``readonly``), and a waiting ``open(name, wait=...)`` returns.
        This buffer's arrays made from now on are read-only (``readonly`` turns True). Arrays
        made before, here or in processes that opened it writable before, keep writing: nothing
        is re-protected under them (a stray write would then kill the process), so seal after
        the last write. Idempotent. A private or file buffer is :class:`InvalidArgumentError`;
        a buffer opened read-only cannot seal a segment not sealed yet (:class:`ReadOnlyError`).

        >>> buf = zcbuf.empty((3,), "f8", name="result")
        >>> buf.asarray()[:] = [1, 2, 3]
        >>> buf.seal()              # a consumer's zcbuf.open("result", wait=10) returns now
        """
        if self._mem is None:
            raise self._freed_error()
        check(lib.zcbuf_seal(self._id))
        if self._readonly:
            return
        # New arrays from now on come from a read-only root over the same lease; the writable
        # root stays with the arrays made from it (kept in _keep, so free() flags both).
        old = self._mem
        mem = _root(memoryview(old._export).toreadonly(), old.kind, old.name, old.path, True)
        d = self._default
        self._default = _frombuffer(mem, d.dtype, d.size).reshape(d.shape) if d is not None else None
        self._keep = old
        self._mem = mem
        self._readonly = True

    # -- arrays -----------------------------------------------------------------------------

    def asarray(self, dtype: Any = None, shape: Optional[ShapeLike] = None) -> np.ndarray:
        """A NumPy array over the buffer's memory, without a copy.

        Defaults to the stored dtype and shape, else a 1-D ``uint8`` array. With ``dtype`` only,
        a 1-D array of as many items as fit exactly; with ``shape``, the leading bytes of the
        buffer. The array keeps the memory mapped until it and its views are gone.

        >>> a = zcbuf.create(16).asarray("u4")
        >>> a.shape
        (4,)
        """
        if dtype is None and shape is None:
            d = self._default
            if d is None:
                raise self._freed_error()
            return d.view()
        mem = self._mem
        if mem is None:
            raise self._freed_error()
        if dtype is None:
            dt = self._dtype if self._dtype is not None else np.dtype(np.uint8)
        else:
            dt = np.dtype(dtype)
            _dtype.check_dtype(dt)
        if shape is not None and not isinstance(shape, (int, np.integer)) and -1 in tuple(shape):
            shape = _infer_dim(tuple(shape), dt, self._nbytes)
        if shape is None:
            if self._nbytes % dt.itemsize:
                raise InvalidArgumentError(
                    f"{self._nbytes} bytes are not a whole number of {dt} items "
                    f"({dt.itemsize} bytes each): pass a shape"
                )
            shp: Tuple[int, ...] = (self._nbytes // dt.itemsize,)
        else:
            shp = _shape_tuple(shape)
        need = math.prod(shp) * dt.itemsize
        if need > self._nbytes:
            raise InvalidArgumentError(
                f"shape {shp} of {dt} needs {need} bytes; the buffer has {self._nbytes}"
            )
        return np.frombuffer(mem, dtype=dt, count=math.prod(shp)).reshape(shp)

    def __array__(self, dtype: Any = None, copy: Optional[bool] = None) -> np.ndarray:
        return array_protocol(self.asarray(), dtype, copy)

    # -- interop: the buffer protocol, __array_interface__, DLPack -----------------------------
    #
    # Every export is a view of the default array, so it holds the lease: a consumer keeps the
    # memory mapped after free(), like any array. After free() no new export is made.

    @property
    def _export(self) -> np.ndarray:
        """What a consumer that asks for a format (``memoryview(buf)``, NumPy) gets through the
        buffer protocol's C slot: the default array — typed when the buffer is, else its bytes.
        Structured, void and datetime dtypes have no faithful buffer-protocol format: those
        requests are refused (``BufferError``), so NumPy falls back to ``__array_interface__``
        and keeps the exact dtype."""
        d = self._array_now()
        dt = self._dtype
        if dt is not None and (dt.fields is not None or dt.kind in "MmV"):
            raise BufferError(
                f"a zcbuf buffer of dtype {dt} has no buffer-protocol format that keeps its type: "
                "use buf.asarray() (or np.asarray(buf)); bytes(buf), hashlib and pyarrow get its "
                "raw bytes"
            )
        return d

    def _array_now(self) -> np.ndarray:
        """The default array, or NotFoundError after free()."""
        d = self._default
        if d is None:
            raise self._freed_error()
        return d

    @property
    def _export_bytes(self) -> Any:
        """What a consumer that wants bytes only (``hashlib``, sockets, ``pa.py_buffer``) gets:
        the raw bytes, for every dtype."""
        m = self._mem
        if m is None:
            raise self._freed_error()
        return m

    def __bytes__(self) -> bytes:
        """A copy of the buffer's bytes."""
        return bytes(memoryview(self._export_bytes))

    @property
    def __array_interface__(self) -> Dict[str, Any]:
        """NumPy's array interface of the default array; the consumer keeps this object (and so
        the memory) as its base."""
        a = self._array_now()
        dt = a.dtype
        if dt.fields is not None and _descr_loses(dt):
            # The interface carries dtype.descr, which spells padding as fields of its own:
            # NumPy then skips to __array__, which keeps the exact dtype.
            raise AttributeError("__array_interface__")
        return a.__array_interface__

    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: Optional[Tuple[int, int]] = None,
        dl_device: Any = None,
        copy: Optional[bool] = None,
    ) -> Any:
        """Export the default array as a DLPack capsule (CPU memory).

        The capsule holds the lease until its consumer deletes it, even after :meth:`free`.
        A writable buffer is exported without a copy. A read-only buffer is exported without a
        copy only when the consumer asks for that (``copy=False``), and then as a DLPack 1.x
        capsule carrying the read-only flag (an unversioned request, which cannot carry it, is
        refused with ``BufferError``); by default (``copy=None``) it is exported as a copy,
        because some consumers ignore the flag — PyTorch does, and a write through its tensor
        would kill the process. ``copy=True`` always copies.
        """
        a = self._array_now()
        if dl_device is not None and tuple(dl_device) != (1, 0):
            raise BufferError(f"zcbuf memory is on the CPU (device (1, 0)), not {tuple(dl_device)}")
        if stream is not None:
            raise BufferError("stream must be None for CPU memory")
        if copy is None and self._readonly:
            copy = True  # read-only pages are lent only on an explicit copy=False
        kw: Dict[str, Any] = {}
        if max_version is not None:
            kw["max_version"] = max_version
        if copy is not None:
            kw["copy"] = copy
        try:
            return a.__dlpack__(**kw)
        except TypeError:
            if not kw:
                raise
        # NumPy < 2.1: no max_version/copy; the spec lets a producer answer with a legacy
        # (unversioned) capsule, which cannot say "read-only".
        if copy is False and self._readonly:
            raise BufferError(
                "a read-only buffer is lent through DLPack only with its read-only flag, which "
                "this NumPy cannot set (it needs NumPy >= 2.1); use copy=None, or buf.asarray()"
            )
        return (a.copy() if copy else a).__dlpack__()

    def __dlpack_device__(self) -> Tuple[int, int]:
        """``(1, 0)``: DLPack's CPU device."""
        return (1, 0)

    def _freed_error(self) -> NotFoundError:
        return NotFoundError(
            f"buffer {self._id} was freed: arrays made before stay valid, but no new ones "
            "can be made"
        )

    # -- lifetime ---------------------------------------------------------------------------

    def free(self) -> None:
        """Retire the buffer now. Idempotent, like ``file.close()``.

        Arrays already made stay valid; the memory is unmapped when the last is collected. A
        file buffer is flushed to disk; a shared buffer's name is removed when no live process
        holds it any more.

        >>> a = buf.asarray(); buf.free(); a[0]    # still valid
        """
        # No lock: two threads racing here both call zcbuf_free; the loser gets "not found",
        # which is ignored below, so free stays idempotent.
        mem = self._mem
        if mem is None:
            return
        # The object keeps the memory while it lives (a raw-pointer consumer such as
        # ``pa.foreign_buffer(addr, n, base=buf)`` relies on that); only the id goes now.
        if self._keep is not None:  # the writable root seal() replaced
            self._keep.freed = True
        self._keep = mem
        mem.freed = True
        self._mem = None
        self._default = None
        self._owned = False
        status = lib.zcbuf_free(self._id)
        if status != lib.ZCBUF_ENOTFOUND:  # already retired elsewhere: the state we want
            check(status)

    def flush(self) -> None:
        """Write a file buffer's data to disk now (msync); a no-op for other kinds."""
        if self._mem is None:
            raise self._freed_error()
        check(lib.zcbuf_flush(self._id))

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def __reduce__(self) -> Any:
        if self._mem is None:
            # Refused here, in the sender: a handle that cannot be opened would otherwise fail
            # in the receiver, where multiprocessing.Pool hangs and ProcessPoolExecutor breaks.
            raise NotFoundError(
                f"buffer {self._id} was freed: it cannot be sent to another process (its name "
                "may be gone before the receiver opens it); send it before free()"
            )
        if self._kind == "shared":
            return (_reopen_shared, (self._name, self._readonly))
        if self._kind == "file":
            return (_reopen_file, (self._path, self._readonly))
        raise TypeError(
            "a private zcbuf buffer cannot be pickled (that would copy it): create it with "
            "shared=True or a path so other processes can open it by name"
        )

    def __len__(self) -> int:
        return self._nbytes

    def __repr__(self) -> str:
        where = f" name={self._name!r}" if self._name else f" path={self._path!r}" if self._path else ""
        typed = f" dtype={self._dtype} shape={self._shape}" if self._dtype is not None else ""
        state = " freed" if self._mem is None else ""
        ro = " readonly" if self._readonly else ""
        return f"<zcbuf.Buffer id={self._id} {self._kind}{where} nbytes={self._nbytes}{typed}{ro}{state}>"


def _reopen_shared(name: str, readonly: bool) -> Buffer:
    return open(name, readonly=readonly)


def _reopen_file(path: str, readonly: bool) -> Buffer:
    return open_file(path, readonly=readonly)


def _infer_dim(shape: Tuple[Any, ...], dt: np.dtype, nbytes: int) -> Tuple[int, ...]:
    """A shape with one -1 (as NumPy's reshape takes it), the -1 made to fill the buffer."""
    if list(shape).count(-1) > 1:
        raise InvalidArgumentError(f"shape {shape} has more than one -1")
    rest = math.prod(int(operator.index(d)) for d in shape if d != -1) * dt.itemsize
    if rest == 0 or nbytes % rest:
        raise InvalidArgumentError(
            f"shape {shape} of {dt} does not divide the buffer's {nbytes} bytes"
        )
    return tuple(nbytes // rest if d == -1 else int(d) for d in shape)


def _shape_tuple(shape: ShapeLike) -> Tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shp: Tuple[int, ...] = (int(shape),)
    else:
        try:
            shp = tuple(int(operator.index(d)) for d in shape)
        except TypeError:
            raise InvalidArgumentError(f"shape {shape!r} is not a sequence of integers") from None
    if any(d < 0 for d in shp):
        raise InvalidArgumentError(f"shape {shp} has a negative dimension")
    if any(d >= 1 << 64 for d in shp):
        raise InvalidArgumentError(f"shape {shp} has a dimension of 2**64 or more")
    if len(shp) > 64:
        raise InvalidArgumentError(f"shape has {len(shp)} dimensions; at most 64 are supported")
    return shp


def _target(shared: bool, name: Optional[str], path: Optional[PathLike]) -> Tuple[int, Any]:
    if path is not None:
        if shared or name is not None:
            raise InvalidArgumentError("give either path= (a file) or shared=/name=, not both")
        # Absolute: the path travels to other processes (pickling, zcbuf.share) whose working
        # directory may differ.
        return lib.ZCBUF_KIND_FILE, os.fsencode(os.path.abspath(path))
    if name is not None or shared:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        return lib.ZCBUF_KIND_SHARED, (name.encode("utf-8") if name is not None else ffi.NULL)
    return lib.ZCBUF_KIND_PRIVATE, ffi.NULL


def _flags(kind: int, reserve: bool, populate: bool, huge_pages: bool = False, persist: bool = False) -> int:
    if persist and kind != lib.ZCBUF_KIND_SHARED:
        raise InvalidArgumentError(
            "persist=True is for shared buffers (files always persist; private memory cannot)"
        )
    return (
        (0 if reserve else lib.ZCBUF_NO_RESERVE)
        | (lib.ZCBUF_POPULATE if populate else 0)
        | (lib.ZCBUF_HUGE_PAGES if huge_pages else 0)
        | (lib.ZCBUF_PERSIST if persist else 0)
    )


def _check_create(status: int) -> None:
    """``check`` for creates: a name this very process still holds gets a hint saying how."""
    try:
        check(status)
    except AlreadyExistsError as e:
        held_by = re.search(r"held by live process\(es\) ([\d, ]+)", str(e))
        if held_by and str(os.getpid()) in re.findall(r"\d+", held_by.group(1)):
            raise AlreadyExistsError(
                f"{e} (this process is one of them: a Buffer object, array or export of that "
                "segment is still alive here; after free(), drop the Buffer too, e.g. `del buf`)"
            ) from None
        raise


def create(
    nbytes: int,
    *,
    shared: bool = False,
    name: Optional[str] = None,
    path: Optional[PathLike] = None,
    reserve: bool = True,
    populate: bool = False,
    huge_pages: bool = False,
    persist: bool = False,
) -> Buffer:
    """A zero-filled buffer of ``nbytes`` raw bytes.

    Private by default; ``shared=True`` (or a ``name``) makes a POSIX shared-memory segment that
    other processes open with :func:`open`; ``path`` makes a memory-mapped file. Pages are
    reserved up front (``reserve=False`` gives up the guarantee that a full /dev/shm is an
    error here rather than a crash later); ``populate=True`` pre-faults them;
    ``huge_pages=True`` asks for transparent huge pages (private buffers; advice only).

    A shared buffer's name lives exactly as long as some process maps the segment; the last
    one to unmap it removes the name. ``persist=True`` keeps it after that, until
    :func:`zcbuf.unlink` (``gc`` leaves it too). Creating a name that a segment no process
    holds still has (a producer that crashed) replaces that segment; a held or persistent one
    gives :class:`AlreadyExistsError` saying who holds it.

    >>> with zcbuf.create(1 << 20, shared=True) as buf:
    ...     buf.asarray()[:4] = 7
    """
    n = operator.index(nbytes)
    if n < 0:
        raise InvalidArgumentError(f"nbytes must be >= 0, not {n}")
    kind, target = _target(shared, name, path)
    out = ffi.new("uint64_t *")
    _check_create(
        lib.zcbuf_create_ex(kind, target, n, ffi.NULL, 0, ffi.NULL, 0, _flags(kind, reserve, populate, huge_pages, persist), out)
    )
    return Buffer(out[0], owned=True)


def empty(
    shape: ShapeLike,
    dtype: Any = float,
    *,
    shared: bool = False,
    name: Optional[str] = None,
    path: Optional[PathLike] = None,
    reserve: bool = True,
    populate: bool = False,
    huge_pages: bool = False,
    persist: bool = False,
) -> Buffer:
    """A typed buffer whose dtype and shape are stored with it (memory is zero-filled).

    Another process that opens it by name gets the same typed array from ``asarray()``.
    The options are those of :func:`create`.

    >>> buf = zcbuf.empty((480, 640, 3), "u1", shared=True)
    >>> buf.asarray().shape
    (480, 640, 3)
    """
    shp = _shape_tuple(shape)
    dt = np.dtype(dtype)
    if dt.subdtype is not None:  # ("f4", (3,)): NumPy flattens a sub-array dtype into the shape
        dt, sub = dt.subdtype
        shp = _shape_tuple(shp + tuple(sub))
    text = _dtype.encode(dt)
    nbytes = math.prod(shp) * dt.itemsize
    if nbytes >= 1 << 64:
        raise InvalidArgumentError(
            f"shape {shp} of {dt} ({dt.itemsize}-byte items) needs {nbytes} bytes: more than "
            "64 bits can count"
        )
    kind, target = _target(shared, name, path)
    dims = ffi.new("uint64_t[]", list(shp) or [0])
    out = ffi.new("uint64_t *")
    _check_create(
        lib.zcbuf_create_ex(
            kind, target, nbytes, text, dt.itemsize, dims, len(shp), _flags(kind, reserve, populate, huge_pages, persist), out
        )
    )
    return Buffer(out[0], owned=True)


zeros = empty


def from_array(
    array: Any,
    *,
    shared: bool = False,
    name: Optional[str] = None,
    path: Optional[PathLike] = None,
    persist: bool = False,
) -> Buffer:
    """A new typed buffer holding a copy of ``array`` (one copy, to share it from then on).

    ``array`` is anything NumPy can view without a copy: an ndarray, a buffer-protocol object
    (``memoryview``, ``bytes``, a pyarrow buffer), an ``__array_interface__`` or a DLPack
    producer on the CPU (a torch tensor, a JAX or CuPy-on-host array), or a nested sequence.

    >>> buf = zcbuf.from_array(np.arange(6.0).reshape(2, 3), shared=True)
    >>> zcbuf.open(buf.name).asarray()[1, 2]
    5.0
    """
    a = _as_ndarray(array)
    buf = empty(a.shape, a.dtype, shared=shared, name=name, path=path, persist=persist)
    try:
        np.copyto(buf.asarray(), a)
    except BaseException:
        buf.free()
        raise
    return buf


def _as_ndarray(x: Any) -> np.ndarray:
    """``x`` as an ndarray, through DLPack first when it speaks it (a torch tensor that
    requires grad, for one, refuses ``__array__`` but exports DLPack)."""
    if isinstance(x, np.ndarray):
        return x
    x = _resolve_lazy_bits(x)
    if hasattr(x, "__dlpack__") and not isinstance(x, Buffer):
        try:
            return np.from_dlpack(x)
        except (BufferError, TypeError, RuntimeError, ValueError):
            pass  # not on the CPU, or a dtype DLPack cannot carry: NumPy's other routes
    return np.asarray(x)


def _resolve_lazy_bits(x: Any) -> Any:
    """A torch tensor with its lazy conjugate or negative bit set exports its raw storage through
    DLPack (the bit is lost, and with it the sign): materialise such a view first."""
    for test, resolve in (("is_conj", "resolve_conj"), ("is_neg", "resolve_neg")):
        t = getattr(x, test, None)
        if callable(t) and t():
            x = getattr(x, resolve)()
    return x


def from_dlpack(
    x: Any,
    *,
    shared: bool = False,
    name: Optional[str] = None,
    path: Optional[PathLike] = None,
    persist: bool = False,
) -> Buffer:
    """A new typed buffer holding a copy of the DLPack producer ``x`` (a torch tensor, a NumPy
    or JAX array, another Buffer...), read once through ``x.__dlpack__()`` without an
    intermediate copy. The options are those of :func:`from_array`.

    zcbuf owns the memory of its buffers, so importing is one copy; from then on the buffer is
    shared without copies (``torch.from_dlpack(buf)`` views it again).

    >>> t = torch.arange(6.0).reshape(2, 3)
    >>> buf = zcbuf.from_dlpack(t, shared=True)
    >>> zcbuf.open(buf.name).asarray()[1, 2]
    5.0
    """
    if not hasattr(x, "__dlpack__"):
        raise InvalidArgumentError(
            f"{type(x).__name__} does not speak DLPack (no __dlpack__): use zcbuf.from_array"
        )
    try:
        a = np.from_dlpack(_resolve_lazy_bits(x))
    except (BufferError, TypeError, RuntimeError) as e:
        raise InvalidArgumentError(f"cannot read {type(x).__name__} through DLPack: {e}") from None
    return from_array(a, shared=shared, name=name, path=path, persist=persist)


def open(name: str, *, readonly: bool = False, wait: Optional[float] = None) -> Buffer:  # noqa: A001 - the contract's name
    """Open a shared buffer by name, from any process of the same user.

    Its header is validated first; a typed buffer gives its typed array. ``readonly=True`` maps
    it ``PROT_READ``: its arrays are not writeable and cannot be made so. A sealed segment
    (:meth:`Buffer.seal`) is always mapped so, whatever ``readonly`` says. This process holds
    the segment (keeps its name alive) while it maps any part of it: this buffer, or any array
    or view made from it, even after :meth:`Buffer.free`.

    ``wait`` (seconds): wait until a segment of that name exists *and is sealed*, then open it
    (read-only); ``wait=0`` looks once. The wait uses no CPU (inotify), releases the GIL, and
    Ctrl-C interrupts it. :class:`Timeout` when the time runs out; :class:`NotFoundError` at
    once when the name exists unsealed and no process holds it any more (its creator died
    before sealing).

    >>> frames = zcbuf.open("camera-0", readonly=True).asarray()   # in a worker process
    >>> result = zcbuf.open("result", wait=30).asarray()           # once its producer sealed it
    """
    if type(name) is not str and not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    if wait is not None:
        return _open_waiting(name, readonly, wait)
    out = _new(_OPENED_T)
    status = _open_acquire(name.encode(), _READ_ONLY if readonly else 0, out)
    if status:
        check(status)
    info = out.info
    if info.dtype_len or info.readonly:
        # The general path: typed (dtype parse, checks) or read-only.
        text = _string(out.dtype) if info.dtype_len else b""
        shape = tuple(_unpack(out.shape, info.ndim)) if info.dtype_len else ()
        b = _new_object(Buffer)
        b._setup(out.id, out.ptr, out.len, info, text, shape, name, None, True)
        return b
    # Raw bytes, read-write: the same as _setup, with nothing to check (about 1 µs less).
    id_ = out.id
    n = out.len
    b = _new_object(Buffer)
    b._owned = False
    b._mem = None
    try:
        mem = _root(_ffi_buffer(_gc(out.ptr, _release(id_)), n), "shared", name, None, False)
        b._default = _frombuffer(mem, _U8)
    except BaseException:  # (MemoryError): the cdata's collection gives the lease back
        _free(id_)
        raise
    b._id = id_
    b._nbytes = n
    b._kind = "shared"
    b._readonly = False
    b._persistent = bool(info.persistent)
    b._name = name
    b._path = None
    b._dtype = None
    b._shape = None
    b._mem = mem
    b._keep = None
    b._owned = True
    return b


# The longest native wait of one call: Python runs signal handlers (Ctrl-C) between calls.
_WAIT_SLICE_MS = 50


def _open_waiting(name: str, readonly: bool, wait: float) -> Buffer:
    """``open(name, wait=...)``: native waits of at most 50 ms each, until the deadline."""
    if isinstance(wait, bool) or not isinstance(wait, (int, float)):
        raise TypeError(f"wait must be a number of seconds, not {type(wait).__name__}")
    if not wait >= 0:  # negative or NaN
        raise InvalidArgumentError(f"wait must be >= 0 seconds, not {wait!r}")
    deadline = time.monotonic() + float(wait)
    encoded = name.encode()
    flags = _READ_ONLY if readonly else 0
    out = ffi.new("uint64_t *")
    while True:
        left = deadline - time.monotonic()
        ms = _WAIT_SLICE_MS if left > 1 else max(0, math.ceil(left * 1000))
        status = lib.zcbuf_open_shared_wait(encoded, flags, min(ms, _WAIT_SLICE_MS), out)
        if status == 0:
            return Buffer(out[0], owned=True, name=name)
        if status != lib.ZCBUF_ETIMEDOUT:
            check(status)
        if time.monotonic() >= deadline:
            raise Timeout(f"gave up after waiting {wait} s: {last_error()}")


def open_file(path: PathLike, *, readonly: bool = False) -> Buffer:
    """Open a file made by zcbuf (typed as it was created); its header is validated first.

    >>> zcbuf.empty((3,), "i8", path="/tmp/counts.zcbuf").free()
    >>> zcbuf.open_file("/tmp/counts.zcbuf").asarray()
    array([0, 0, 0])
    """
    out = ffi.new("uint64_t *")
    check(lib.zcbuf_open_file(os.fsencode(os.path.abspath(path)), lib.ZCBUF_READ_ONLY if readonly else 0, out))
    return Buffer(out[0], owned=True)


def get(id: int) -> Buffer:  # noqa: A002 - the contract's name
    """A buffer of this process's registry by id (e.g. made in C or Rust).

    The returned object takes its own lease; it does not free the id when collected (the
    creator owns it), but :meth:`Buffer.free` does retire it.

    >>> buf_id = my_extension.make_frame()        # a C function that called zcbuf_create
    >>> frame = zcbuf.get(buf_id).asarray()
    """
    i = operator.index(id)
    if not 0 < i < 2**64:
        raise NotFoundError(f"buffer id {i} is not live")
    return Buffer(i, owned=False)
