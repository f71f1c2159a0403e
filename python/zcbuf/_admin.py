"""Listing and reaping shared segments (``python -m zcbuf ls`` / ``gc``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ._errors import check
from ._native import ffi, lib

__all__ = ["Segment", "ls", "gc", "unlink"]


@dataclass(frozen=True)
class Segment:
    """A zcbuf segment in /dev/shm, as :func:`ls` reports it."""

    name: str
    nbytes: int
    dtype: str
    shape: Optional[Tuple[int, ...]]
    holders_alive: int
    holders_dead: int
    created: float
    """Creation time, seconds since the epoch."""
    creator_pid: int
    problem: str
    """Why the header is unusable ("" when it is valid)."""

    @property
    def age(self) -> float:
        """Seconds since creation."""
        return max(0.0, time.time() - self.created) if self.created else 0.0


def ls() -> List[Segment]:
    """The zcbuf segments in /dev/shm visible to this user, with their holders alive/dead.

    >>> [(s.name, s.holders_alive, s.holders_dead) for s in zcbuf.ls()]
    [('zcbuf-3f2a...', 1, 0)]
    """
    n = ffi.new("size_t *")
    cap = 1 << 16
    while True:
        buf = ffi.new("char[]", cap)
        check(lib.zcbuf_list(buf, cap, n))
        if n[0] < cap:
            break
        cap = n[0] + (1 << 12)
    out = []
    for line in ffi.string(buf).decode("utf-8", "replace").splitlines():
        f = line.split("\t")
        if len(f) != 9:
            continue
        shape = tuple(int(d) for d in f[3].split(",") if d) if f[2] else None
        out.append(
            Segment(
                name=f[0],
                nbytes=int(f[1]),
                dtype=f[2],
                shape=shape,
                holders_alive=int(f[4]),
                holders_dead=int(f[5]),
                created=int(f[6]) / 1e9,
                creator_pid=int(f[7]),
                problem=f[8],
            )
        )
    return out


def gc() -> List[str]:
    """Reap holders that died (killed, crashed) and remove segments no live process holds.

    Returns the names removed. Nothing a live process holds is ever removed.

    >>> zcbuf.gc()          # after a worker was SIGKILLed while it was the last holder
    ['zcbuf-3f2a...']
    """
    cap = 1 << 20
    buf = ffi.new("char[]", cap)
    n = ffi.new("size_t *")
    count = ffi.new("size_t *")
    check(lib.zcbuf_gc(buf, cap, n, count))
    names = ffi.string(buf).decode("utf-8", "replace").split("\n") if n[0] else []
    return [x for x in names if x]


def unlink(name: str) -> None:
    """Remove a segment's name now, whoever holds it (their arrays stay valid).

    >>> zcbuf.unlink("camera-0")    # new opens fail; existing arrays keep working
    """
    check(lib.zcbuf_unlink(name.encode("utf-8")))
