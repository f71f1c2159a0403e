"""Storing NumPy dtypes as the printable text kept in a buffer's header, and back."""

from __future__ import annotations

import ast

import numpy as np

from numpy.lib.format import descr_to_dtype, dtype_to_descr

from ._errors import CorruptError, InvalidArgumentError

DTYPE_CAP = 512


def check_dtype(dt: np.dtype) -> None:
    """Refuse dtypes that cannot live in shared memory."""
    if dt.hasobject:
        raise InvalidArgumentError(
            f"dtype {dt} holds Python objects, which cannot be shared between processes: "
            "use fixed-size strings (e.g. 'S16' or 'U16') or numeric fields"
        )
    if dt.itemsize == 0:
        raise InvalidArgumentError(f"dtype {dt} has no size: give fields or a length")


def encode(dt: np.dtype) -> bytes:
    """The header text for ``dt``: ``dt.str`` for plain types, the descr list otherwise."""
    check_dtype(dt)
    if dt.fields is None and dt.subdtype is None:
        text = dt.str
    else:
        text = repr(dtype_to_descr(dt))
    raw = text.encode("ascii", "strict")
    if len(raw) > DTYPE_CAP:
        raise InvalidArgumentError(
            f"dtype {dt} is described by {len(raw)} bytes; at most {DTYPE_CAP} fit in the header"
        )
    return raw


def decode(text: str) -> np.dtype:
    """The dtype stored as ``text``; ``CorruptError`` if it is not a valid descriptor."""
    try:
        if text.startswith(("[", "(")):
            return descr_to_dtype(ast.literal_eval(text))
        return np.dtype(text)
    except Exception as e:  # noqa: BLE001 - any failure means a bad header
        raise CorruptError(f"the stored dtype {text!r} is not a valid NumPy dtype: {e}") from None
