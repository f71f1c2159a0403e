"""The buffer protocol for :class:`zcbuf.Buffer` on every CPython, without a compiler.

CPython before 3.12 lets only a C type export the buffer protocol (``memoryview(buf)``,
``bytes(buf)``, ``pa.py_buffer(buf)``, ``torch.frombuffer(buf)``); a Python class cannot, and
PEP 688's ``__buffer__`` exists only from 3.12. So we make one tiny C type at import time with
``PyType_FromSpec``, whose only slot, ``bf_getbuffer``, is ``zcbuf_py_getbuffer`` from our own
library: it hands each request on to the object's ``_export`` attribute (a NumPy array or a
memoryview that holds a lease). Python subclasses inherit the slot; on 3.12+ CPython also gives
them ``__buffer__`` for it, so ``isinstance(buf, collections.abc.Buffer)`` holds.

Where ``ctypes.pythonapi`` is missing (not CPython), the base is ``object`` and only the 3.12+
``__buffer__`` route remains (see :func:`fallback_buffer`).
"""

from __future__ import annotations

import ctypes
from typing import Any, Tuple

from ._native import ffi, lib

__all__ = ["ExportBase", "NATIVE"]

_Py_bf_getbuffer = 1  # typeslots.h
_Py_TPFLAGS_BASETYPE = 1 << 10
_Py_TPFLAGS_HAVE_VERSION_TAG = 1 << 18


class _Slot(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_int), ("pfunc", ctypes.c_void_p)]


class _Spec(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("basicsize", ctypes.c_int),
        ("itemsize", ctypes.c_int),
        ("flags", ctypes.c_uint),
        ("slots", ctypes.POINTER(_Slot)),
    ]


# Kept for the life of the process: on 3.11 a spec-made type's tp_name points into spec.name.
_KEEP: Tuple[Any, ...] = ()


def _make_base() -> type:
    global _KEEP
    api = ctypes.pythonapi

    def addr(fn: Any) -> Any:
        return ffi.cast("void *", ctypes.cast(fn, ctypes.c_void_p).value)

    status = lib.zcbuf_py_setup(
        addr(api.PyObject_GetAttrString), addr(api.PyObject_GetBuffer), addr(api.Py_DecRef)
    )
    if status:
        raise OSError(f"zcbuf_py_setup returned {status}")
    getbuffer = int(ffi.cast("uintptr_t", lib.zcbuf_py_getbuffer))
    slots = (_Slot * 2)(_Slot(_Py_bf_getbuffer, getbuffer), _Slot(0, None))
    name = b"zcbuf._ExportBase"
    spec = _Spec(name, object.__basicsize__, 0, _Py_TPFLAGS_BASETYPE | _Py_TPFLAGS_HAVE_VERSION_TAG, slots)
    from_spec = api.PyType_FromSpec
    from_spec.restype = ctypes.py_object
    from_spec.argtypes = [ctypes.POINTER(_Spec)]
    base = from_spec(ctypes.byref(spec))
    _KEEP = (name, slots, spec)
    if not isinstance(base, type):
        raise TypeError("PyType_FromSpec did not return a type")
    return base


try:
    ExportBase: type = _make_base()
    NATIVE = True
except (AttributeError, OSError, TypeError, ValueError):  # not CPython, or no ctypes API
    ExportBase = object
    NATIVE = False
